"""Random ``<adjective>-<noun>`` run names, as the Simvue clients generate them."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping

ADJECTIVES = (
    'able', 'active', 'agile', 'airy', 'amber', 'ancient', 'azure', 'bold', 'brave', 'breezy',
    'bright', 'brisk', 'calm', 'candid', 'careful', 'cheerful', 'clever', 'cosmic', 'crisp',
    'curious', 'daring', 'deep', 'eager', 'early', 'earnest', 'easy', 'electric', 'elegant',
    'fancy', 'fast', 'fearless', 'fierce', 'fluent', 'flying', 'gentle', 'gifted', 'glad',
    'golden', 'graceful', 'grand', 'happy', 'hardy', 'honest', 'humble', 'icy', 'jolly', 'keen',
    'kind', 'lively', 'lucky', 'lunar', 'magic', 'mellow', 'merry', 'mighty', 'misty', 'modest',
    'noble', 'nimble', 'polar', 'polite', 'proud', 'quick', 'quiet', 'rapid', 'rare', 'ready',
    'regal', 'robust', 'rosy', 'rustic', 'shiny', 'silent', 'silver', 'simple', 'sleek',
    'smooth', 'snowy', 'solar', 'solid', 'sonic', 'spare', 'spry', 'stable', 'steady',
    'stellar', 'stoic', 'sunny', 'swift', 'tidy', 'tiny', 'tranquil', 'upbeat', 'vast', 'vivid',
    'warm', 'wise', 'witty', 'young', 'zesty',
)
NOUNS = (
    'anchor', 'apple', 'arrow', 'aurora', 'badger', 'beacon', 'birch', 'bison', 'breeze',
    'brook', 'canyon', 'cedar', 'comet', 'coral', 'cosmos', 'crane', 'creek', 'dawn', 'delta',
    'dolphin', 'dune', 'eagle', 'ember', 'falcon', 'fern', 'field', 'finch', 'fjord', 'forest',
    'fox', 'galaxy', 'garnet', 'geyser', 'glacier', 'grove', 'harbor', 'hawk', 'heron',
    'horizon', 'island', 'jaguar', 'jasper', 'kestrel', 'lagoon', 'lake', 'lantern', 'lark',
    'lemur', 'lichen', 'lotus', 'lynx', 'maple', 'marble', 'meadow', 'mesa', 'meteor', 'moon',
    'moose', 'nebula', 'oak', 'ocean', 'orbit', 'orchid', 'otter', 'owl', 'panda', 'pebble',
    'pine', 'planet', 'plume', 'prairie', 'quartz', 'quasar', 'raven', 'reef', 'ridge', 'river',
    'robin', 'sequoia', 'shore', 'sparrow', 'spruce', 'star', 'stone', 'summit', 'swan',
    'thunder', 'tiger', 'tundra', 'valley', 'violet', 'walrus', 'willow', 'wolf', 'wren',
    'zenith',
)

_random = random.SystemRandom()


def random_name() -> str:
    """A fresh name such as ``swift-otter``."""
    return f"{_random.choice(ADJECTIVES)}-{_random.choice(NOUNS)}"


def default_name(environ: Mapping[str, str] | None = None) -> str:
    """The name of a run given none: a random one, except in a Slurm job array, where the
    tasks' runs share one random name ending in their index (``swift-otter-0``,
    ``swift-otter-1``...), so that they read as one sweep and each says which task it was."""
    env = os.environ if environ is None else environ
    task = env.get("SLURM_ARRAY_TASK_ID")
    if not task or not task.isdigit():
        return random_name()
    array = random.Random(f"{env.get('SLURM_CLUSTER_NAME', '')}/{env.get('SLURM_ARRAY_JOB_ID', '')}")
    return f"{array.choice(ADJECTIVES)}-{array.choice(NOUNS)}-{task}"
