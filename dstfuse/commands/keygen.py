"""`dstfuse keygen [-o FILE]`: make a new pre-shared key.

Without -o the key's text goes to stdout (redirect it into a file that only
its owner may read); with -o it is written to a new file created with mode
0600, and an existing file is never overwritten. Key handling itself lives
in `dstfuse.keys`; this module only wires it to the command line.
"""

from __future__ import annotations

import argparse
import sys

from ..keys import write_key_file

HELP = "make a new pre-shared key (stdout, or a new mode-0600 file with -o)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the key to FILE (created with mode 0600; never overwritten)",
    )


def run(args: argparse.Namespace) -> int:
    text = write_key_file(args.output)
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0
