"""Placeholder until this package lands."""


def configure(parser):
    pass


def run(args):
    raise ValueError("'normlab reports' is not built yet")
