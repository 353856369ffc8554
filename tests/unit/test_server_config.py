"""Where the server URL and token come from, and when a run goes online."""

import pytest

from simvue.api.config import resolve
from simvue.errors import SimvueValueError

TOKEN = "header.payload.signature"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_nothing_configured_is_offline_not_an_error(tmp_path):
    config = resolve(cwd=tmp_path, environ={"HOME": str(tmp_path / "home")})
    assert (config.mode, config.url, config.online) == ("offline", None, False)


def test_arguments_win_over_the_environment_which_wins_over_files(tmp_path):
    """The one rule of every setting: the code, then the environment, then files."""
    write(tmp_path / "simvue.toml", '[server]\nurl = "http://file"\ntoken = "file-token"\n')
    environ = {"SIMVUE_URL": "http://env", "SIMVUE_TOKEN": TOKEN, "HOME": str(tmp_path)}
    config = resolve(server_url="http://arg", server_token="arg", cwd=tmp_path, environ=environ)
    assert (config.url, config.token, config.source) == ("http://arg", "arg", "Run() arguments")
    config = resolve(server_url="http://arg", cwd=tmp_path, environ=environ)
    assert (config.url, config.token) == ("http://arg", TOKEN)  # field by field
    config = resolve(cwd=tmp_path, environ=environ)
    assert (config.url, config.token, config.mode, config.source) == ("http://env", TOKEN, "online", "environment")
    assert config.api_url == "http://env/api"
    assert resolve(cwd=tmp_path, environ={"HOME": str(tmp_path)}).url == "http://file"


def test_arguments_win_over_files_field_by_field(tmp_path):
    write(tmp_path / "simvue.toml", '[server]\nurl = "http://file"\ntoken = "file-token"\n')
    config = resolve(server_url="http://arg", cwd=tmp_path, environ={"HOME": str(tmp_path)})
    assert (config.url, config.token) == ("http://arg", "file-token")


def test_toml_found_in_a_parent_directory_with_a_profile(tmp_path):
    write(
        tmp_path / "simvue.toml",
        '[server]\nurl = "http://default"\ntoken = "t1"\n[profiles.other]\nurl = "http://other/api"\ntoken = "t2"\n',
    )
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert resolve(cwd=deep, environ={}).url == "http://default"
    other = resolve(cwd=deep, environ={"SIMVUE_SERVER_PROFILE": "other"})
    assert (other.url, other.token, other.api_url) == ("http://other/api", "t2", "http://other/api")
    with pytest.raises(SimvueValueError, match="profiles.missing"):
        resolve(cwd=deep, environ={"SIMVUE_SERVER_PROFILE": "missing"})


def test_older_ini_and_simtrack_forms(tmp_path):
    simvue = tmp_path / "simvue"
    write(simvue / "simvue.ini", "[server]\nurl = http://ini\ntoken = ini-token\n")
    assert resolve(cwd=simvue, environ={}).url == "http://ini"
    simtrack = tmp_path / "simtrack"
    write(simtrack / "simtrack.ini", "[server]\nurl = http://simtrack\ntoken = st\n")
    assert resolve(cwd=simtrack, environ={}).url == "http://simtrack"
    environ = {"SIMTRACK_URL": "http://st-env", "SIMTRACK_TOKEN": "x"}
    assert resolve(cwd=simtrack, environ=environ).url == "http://st-env"
    # Simtrack settings are read only when no Simvue configuration exists.
    write(simtrack / "simvue.ini", "[server]\nurl = http://ini\ntoken = ini-token\n")
    assert resolve(cwd=simtrack, environ=environ).url == "http://ini"


def test_user_config_directory_is_searched_after_the_working_tree(tmp_path):
    home = tmp_path / "home"
    write(home / ".config" / "simvue" / "simvue.toml", '[server]\nurl = "http://home"\ntoken = "t"\n')
    work = tmp_path / "work"
    work.mkdir()
    assert resolve(cwd=work, environ={"HOME": str(home)}).url == "http://home"


def test_explicit_offline_switches(tmp_path):
    environ = {"SIMVUE_URL": "http://env", "SIMVUE_TOKEN": TOKEN}
    assert resolve("offline", cwd=tmp_path, environ=environ).mode == "offline"
    assert resolve(cwd=tmp_path, environ={**environ, "SIMVUE_MODE": "offline"}).mode == "offline"
    write(tmp_path / "simvue.toml", '[run]\nmode = "disabled"\n')
    assert resolve(cwd=tmp_path, environ=environ).mode == "disabled"
    with pytest.raises(SimvueValueError, match="mode must be"):
        resolve("sideways", cwd=tmp_path, environ=environ)


def test_a_broken_config_file_is_a_clear_error(tmp_path):
    write(tmp_path / "simvue.toml", "[server\nurl=")
    with pytest.raises(SimvueValueError, match="cannot read"):
        resolve(cwd=tmp_path, environ={})
