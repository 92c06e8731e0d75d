"""Revisions of a family's template timed against each other in one process.

Within :func:`template_override`, the family renders its modules from other template text (a
revision kept in a file): the template hash, hence the emitted module, differs per revision, so
revisions compile side by side and a script can interleave their timings. :func:`compile_with`
is :func:`experiments.suite.compile_one` under a revision, for a spawn pool.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import kernels
from experiments.suite import Job, compile_one
from kernels import generator


@contextlib.contextmanager
def template_override(family: str, file: str, text: str) -> Iterator[None]:
    """Within the block, ``family`` reads ``text`` wherever it reads kernels/templates/``file``."""
    fam = kernels.get_family(family)
    saved = generator.template_text

    def patched(name: str) -> str:
        return text if name == file else saved(name)

    def forget() -> None:  # the family's template hash and its memo of loaded modules
        fam.__dict__.pop("template", None)
        fam._resolved.clear()

    generator.template_text = patched
    forget()
    try:
        yield
    finally:
        generator.template_text = saved
        forget()


def compile_with(family: str, file: str, text: str, job: Job) -> str | None:
    """:func:`experiments.suite.compile_one` of ``job`` with ``text`` standing in for ``file``."""
    with template_override(family, file, text):
        return compile_one(job)
