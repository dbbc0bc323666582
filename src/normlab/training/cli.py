"""Placeholder until this package lands."""


def configure(parser):
    pass


def run(args):
    raise ValueError("'normlab training' is not built yet")
