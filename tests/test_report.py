"""sgdjax/training/_report.py: what a run records about the code and machine."""

import subprocess
import types

from sgdjax.training import _report


def test_the_commit_is_read_once_so_a_long_run_names_the_code_it_started_with(monkeypatch):
    heads = iter(["a" * 40, "b" * 40])

    def git(*args, **kwargs):
        return types.SimpleNamespace(stdout=next(heads) + "\n")

    monkeypatch.setattr(subprocess, "run", git)
    _report.code_commit.cache_clear()
    try:
        assert _report.code_commit() == "a" * 40  # the engine reads it when it is built
        assert _report.environment()["commit"] == "a" * 40  # a later HEAD is not read
    finally:
        _report.code_commit.cache_clear()


def test_no_git_means_no_commit(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    _report.code_commit.cache_clear()
    try:
        assert _report.code_commit() is None
    finally:
        _report.code_commit.cache_clear()
