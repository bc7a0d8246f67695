"""The commands (`python -m jobs.<name>`): each parses its flags, builds its config and calls into
distributed/ (quickstart chains train, infer and evaluate)."""

import argparse
import os
import sys

from distributed.config import SettingError, TrainingFailed


def argument_parser(job, **kwargs):
    """The parser of `python -m jobs.<job>`, named as the user ran it (`unet-train` through the console
    script). No abbreviations: `--epoch 3` would run as `--epochs 3`, and a typo must not start a long run."""
    command = os.path.basename(sys.argv[0])
    program = command if command.startswith("unet-") else f"python -m jobs.{job}"
    return argparse.ArgumentParser(prog=program, allow_abbrev=False, **kwargs)


def run_command(work, on_interrupt):
    """`work()`'s exit status; or, if it failed, why on stderr and the status that says how:
    2 for a bad flag or input, 1 for a training run that failed, 130 for Ctrl-C (with
    `on_interrupt`: how to go on)."""
    try:
        return work()
    except SettingError as error:  # a flag's bad value: named as the flag the user typed
        print(f"error: {error.as_flag()}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {on_interrupt}", file=sys.stderr)
        return 130  # the shell's code for a job ended by Ctrl-C
