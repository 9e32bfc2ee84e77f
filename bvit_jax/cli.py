"""What every bvit_jax command shares: absl flags, logging, errors as messages.

Each command module (``bvit_jax.train.trainer``, ``export``, ``predict``, ``interop.timm``,
``data.prepare``) defines its flags on a given ``absl.flags.FlagValues``
(``define_flags(fv, argv)``; ``argv`` is the command line being parsed, which
ml_collections' config flags read their ``--config.FIELD=VALUE`` overrides
from) and a function that runs with them, and exposes::

    main = cli.command("bvit-export", __doc__, define_flags, run)

``main(argv=None) -> int`` parses ``argv`` (default ``sys.argv``) on a fresh
``FlagValues``, so it can be called again in one process (tests, notebooks),
and is the console script's entry point. Flags use absl's syntax
(``--name=value``, ``--flag`` / ``--noflag``, ``--help``).

Exit status: 0 on success; 1 when the command fails with a
:class:`~bvit_jax.errors.UserError` (bad config, data, checkpoint or model
file), printed as ``error: <message>`` on stderr without a traceback
(``--traceback`` adds it, for debugging); 2 for a flag error, with a pointer
to ``--help``. Any other exception is unexpected and propagates with its
traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

from bvit_jax.errors import UserError

__all__ = ["command"]


def _setup_logging() -> None:
    """The project's INFO messages on stderr; libraries (orbax, grain, jax) from WARNING up."""
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("bvit_jax").setLevel(logging.INFO)


def command(
    prog: str,
    doc: str | None,
    define_flags: Callable[[flags.FlagValues, list[str]], None],
    run: Callable[[flags.FlagValues, list[str]], int | None],
) -> Callable[[Sequence[str] | None], int]:
    """Build ``main(argv=None) -> int`` for a command (see the module docstring)."""

    def main(argv: Sequence[str] | None = None) -> int:
        argv = [prog, *(sys.argv[1:] if argv is None else argv)]
        fv = flags.FlagValues()
        define_flags(fv, argv)  # may rewrite argv in place (bvit-train: an installed config's name)
        flags.DEFINE_bool("traceback", False, "On an error, also print the Python traceback.", flag_values=fv)
        if "--help" in argv or "-h" in argv:  # before parsing: required flags may be missing
            print(f"{prog}: {(doc or '').strip()}\n\nFlags:\n{fv.get_help(include_special_flags=False)}")
            return 0
        try:
            args = fv(argv)[1:]
        except flags.Error as e:
            print(f"{prog}: error: {e}\nRun '{prog} --help' for the flags.", file=sys.stderr)
            return 2
        _setup_logging()
        try:
            status = run(fv, args)
        except UserError as e:
            if fv["traceback"].value:
                traceback.print_exc()
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        return int(status or 0)

    return main
