"""Talking to a Simvue server: where it is (``config``) and how requests fail (``connection``)."""
