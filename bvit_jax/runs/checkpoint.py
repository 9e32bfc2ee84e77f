"""Checkpoints with orbax: resumable training state, the best model, and restoring them.

Plain orbax, on the two checkpoint folders of a run folder
(:mod:`bvit_jax.runs.workdir` owns the folder and its ``config.json``, and knows
which model a config builds; this module knows neither)::

    checkpoints/<step>/   the last ``keep`` train states: {state, data, config}
    best/<step>/          the model variables with the best eval top-1 (one kept): the
                          parameters, and a BatchNorm's running statistics beside them

``state`` is the train state pytree (params, optimizer state, step, ...),
``data`` the input iterator's position (grain's own checkpoint handler, one
file per process), so a resumed run continues the same sample sequence;
``config`` the run's config as a dict. Saves are asynchronous;
:meth:`CheckpointStore.close` waits for them. :func:`read_params` restores
the parameters alone (the best ones, or those of the latest train state)
into a target tree the caller builds.

Safety rules: a checkpoint is written only from finite state (the trainer
checks first), and at resume a latest checkpoint that fails to restore is
reported and the previous one is tried; when none restores, the run refuses
to start rather than silently starting from scratch over existing work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from bvit_jax.errors import UserError
from bvit_jax.runs import storage

__all__ = [
    "CheckpointStore",
    "CheckpointError",
    "CheckpointMismatchError",
    "ProcessCountChangedError",
    "DATA_RESUME",
    "config_differences",
    "read_params",
    "Placement",
]

# A function from a tree of ``ShapeDtypeStruct`` s to the tree of shardings to restore them into.
Placement = Callable[[Any], Any]

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used; the message says what to do."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint of another model or optimizer than the config asks for."""


class ProcessCountChangedError(CheckpointError):
    """An intact checkpoint whose input positions were saved by another number of processes (a resized pod)."""


# How a resume positions the input (``config.data_resume``): "exact" restores each process's saved
# iterator position; "from_step" starts the input at the restored step (any process count).
DATA_RESUME = ("exact", "from_step")


def _abstract(tree: Any) -> Any:
    """``ShapeDtypeStruct`` (with sharding) for every array leaf: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
    """Name a manager's cross-process barriers.

    Orbax keys the barrier that ends an async save by the step directory's name
    (``async_write_complete.<step>``). ``latest`` and ``best`` both save step N
    at an eval step, so with more than one process the two saves would share a
    barrier: process 0 could pass it on the other manager's arrival and finalize
    a checkpoint whose other-process metadata was not written yet ("ArrayMetadata
    Store contains metadata from just one process"). A prefix per manager keeps
    the keys apart (``MultiprocessingOptions.barrier_sync_key_prefix``).
    """
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def _state_manager(workdir: storage.epath.Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """The manager of ``workdir/checkpoints``: items ``state``, ``data`` (grain) and ``config``."""
    return ocp.CheckpointManager(
        storage.absolute(workdir / "checkpoints"),
        options=options,
        item_names=("state", "data", "config"),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


class CheckpointStore:
    """The two orbax managers of a workdir: the last ``keep`` states and the best params."""

    def __init__(self, workdir: storage.PathLike, *, keep: int = 3, async_save: bool = True):
        self.workdir = storage.as_path(workdir)
        self.latest = _state_manager(
            self.workdir,
            ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                multiprocessing_options=_barrier_prefix("latest"),
            ),
        )
        self.best = ocp.CheckpointManager(
            storage.absolute(self.workdir / "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: m["eval_top1"],
                best_mode="max",
                enable_async_checkpointing=async_save,
                create=True,
                multiprocessing_options=_barrier_prefix("best"),
            ),
            item_names=("params",),
        )

    # -- saving ---------------------------------------------------------------
    def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
        """Save the train state, the iterator position and the config at ``step``."""
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def save_best(self, step: int, params: Any, eval_top1: float) -> None:
        """Offer ``params`` as the best model; orbax keeps the one with the highest top-1.

        A step the best store already holds is kept as it is: a run that fell back over a damaged
        latest checkpoint replays the steps after it (bit for bit) and evaluates that step again;
        the first, completed save stays (orbax refuses a second save of one step).
        """
        if step in self.best.all_steps():
            log.info("Best store already holds step %d; keeping it.", step)
            return
        self.best.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
            metrics={"eval_top1": float(eval_top1)},
            force=True,
        )

    def close(self) -> None:
        """Wait for the asynchronous saves and release the managers."""
        for m in (self.latest, self.best):
            m.wait_until_finished()
            m.close()

    # -- restoring ------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The step of the newest train state in ``checkpoints/`` (None: there is none)."""
        return self.latest.latest_step()

    def restore(
        self, state_like: Any, data_iterator: Any, config: dict | None = None, *, data_resume: str = "exact"
    ) -> tuple[int, Any] | None:
        """Restore the newest usable checkpoint into ``state_like``'s structure and shardings.

        ``data_resume="exact"`` restores the iterator position in place;
        ``"from_step"`` restores the train state alone (``data_iterator`` is
        not touched: the caller starts the input at the restored step).
        Returns ``(step, state)``, or ``None`` when the workdir has no
        checkpoint. A checkpoint whose arrays do not match ``state_like``
        (the run's config changed) raises :class:`CheckpointMismatchError`
        naming the differences, ``config``'s fields included. A checkpoint
        whose input positions were saved by another number of processes than
        this run has raises :class:`ProcessCountChangedError` (with
        ``"exact"``). A checkpoint that fails to restore otherwise is
        damaged: it is logged and the previous one is tried; if none
        restores, a :class:`CheckpointError` says how to proceed.
        """
        if data_resume not in DATA_RESUME:
            raise ValueError(f"data_resume must be one of {DATA_RESUME}, got {data_resume!r}")
        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            return None
        target = _abstract(state_like)
        errors = []
        for step in steps:
            self._check_structure(step, target, config)
            items = {"state": ocp.args.StandardRestore(target)}
            if data_resume == "exact":
                self._check_process_count(step)
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                out = self.latest.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                log.error(
                    "Checkpoint at step %d in %s cannot be restored (%s); trying an older one.",
                    step,
                    self.latest.directory,
                    errors[-1],
                )
                continue
            if errors:
                self._set_aside(s for s in steps if s > step)
                log.warning("Resumed from step %d after skipping damaged checkpoint(s): %s", step, "; ".join(errors))
            return step, out["state"]
        raise CheckpointError(
            f"No checkpoint in {self.latest.directory} can be restored:\n  "
            + "\n  ".join(errors)
            + "\nRefusing to start from scratch over them. Move the damaged step folders away "
            "(or use a new --workdir) and run again."
        )

    def _check_structure(self, step: int, target: Any, config: dict | None) -> None:
        """Raise :class:`CheckpointMismatchError` if step ``step`` holds other arrays than ``target``.

        Compares the array names and shapes in the checkpoint's metadata with
        the target's. Unreadable metadata is left to the restore (damage).
        """
        try:
            saved = _shapes(self.latest.item_metadata(step)["state"].tree)
        except Exception:  # noqa: BLE001 - damaged metadata: the restore attempt reports it
            return
        wanted = _shapes(target)
        diffs = [f"{k}: only in the checkpoint {saved[k]}" for k in saved.keys() - wanted.keys()]
        diffs += [f"{k}: not in the checkpoint (config wants {wanted[k]})" for k in wanted.keys() - saved.keys()]
        diffs += [
            f"{k}: checkpoint {saved[k]}, config {wanted[k]}"
            for k in saved.keys() & wanted.keys()
            if saved[k] != wanted[k]
        ]
        if not diffs:
            return
        changed = ""
        if config is not None:
            try:
                old = self.latest.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
                changed = "\nConfig fields that differ from the checkpoint's run: " + (
                    "; ".join(config_differences(old, config)) or "none (a code change?)"
                )
            except Exception:  # noqa: BLE001 - the config item is optional information here
                pass
        raise CheckpointMismatchError(
            f"The checkpoint at step {step} in {self.latest.directory} is intact but holds the train state of a "
            f"different model or optimizer than this config ({len(diffs)} arrays differ), e.g.\n  "
            + "\n  ".join(sorted(diffs, key=lambda d: (not d.startswith("params/"), d))[:6])
            + changed
            + "\nTo continue that run, use the config it was started with (saved in each checkpoint and in "
            "config.json); to train this config, use a new --workdir."
        )

    def _check_process_count(self, step: int) -> None:
        """Raise :class:`ProcessCountChangedError` if step ``step``'s input positions are of another process count.

        grain saves one ``process_<i>-of-<n>.json`` per process in the step's
        ``data`` item; a folder without such files is left to the restore.
        """
        folder = storage.as_path(self.latest.directory) / str(step) / "data"
        try:
            counts = {int(p.name.rsplit("-of-", 1)[1].split(".")[0]) for p in folder.glob("process_*-of-*.json")}
        except (OSError, ValueError, IndexError):
            return
        now = jax.process_count()
        if len(counts) != 1 or counts == {now}:
            return
        saved = counts.pop()
        raise ProcessCountChangedError(
            f"The checkpoint at step {step} in {self.latest.directory} is intact, but it holds the input "
            f"positions of {saved} process(es) and this run has {now}: each process's position in the data order "
            "belongs to the process count that saved it. The train state (parameters, optimizer) is usable. To "
            f"continue on {now} process(es), rerun with --config.data_resume=from_step: the input restarts at "
            f"step {step} in the order a {now}-process run reads (every batch is a function of the seed, the "
            "process and the step), so no example order from before is replayed; or run on "
            f"{saved} process(es) again to continue the exact sequence."
        )

    def _set_aside(self, steps) -> None:
        """Move damaged step folders to ``workdir/damaged_checkpoints/`` (kept, never deleted)."""
        if jax.process_index() == 0:
            aside = self.workdir / "damaged_checkpoints"
            aside.mkdir(exist_ok=True)
            for step in steps:
                src = storage.as_path(self.latest.directory) / str(step)
                dst = aside / f"{step}-{int(time.time())}"
                src.rename(dst)
                log.error("Moved damaged checkpoint %s to %s.", src, dst)
        self.latest.reload()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'a/0/b': shape}`` for every leaf; keys as orbax names them (namedtuple fields, list indices)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``['model.preset: baseline -> binaryvit', ...]``: the leaves of two config dicts that differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)  # unset and None (a placeholder) mean the same
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# Restore-only managers: no save ever happens through them, and nothing is created.
# (``read_only=True`` would do the same but logs three warnings per manager.)
_READ_OPTIONS = ocp.CheckpointManagerOptions(create=False)


def read_params(
    workdir: storage.PathLike, target: Any, which: str = "best", *, placement: Placement | None = None
) -> Any:
    """The parameters saved in ``workdir``, restored into ``target``'s structure: best or latest.

    ``target`` is a tree of arrays or ``ShapeDtypeStruct`` s, the model
    variables' pure-dict layout (shapes and dtypes only are used): the
    parameters, and with BatchNorm the running statistics in the same tree.
    ``which="best"`` reads ``best/`` and falls back to the latest train state
    when no eval has run; ``which="latest"`` reads the ``params`` (and
    ``batch_stats``, merged into the same tree) of the latest train state in
    ``checkpoints/``. Whatever topology saved them, the arrays come back
    host-local (on this process's first device), or with ``placement`` (shape
    tree -> tree of ``jax.sharding.Sharding``) each read straight into its
    sharding: on a mesh that spans several processes every process reads
    only its own shards (a host-local restore followed by ``jax.device_put``
    cannot cross hosts). Raises :class:`CheckpointError` when the folder
    holds no checkpoint.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    workdir = storage.as_path(workdir)
    target = _placed(target, placement)
    if which == "best" and (workdir / "best").exists():
        with ocp.CheckpointManager(
            storage.absolute(workdir / "best"),
            item_names=("params",),
            item_handlers={"params": ocp.StandardCheckpointHandler()},
            options=_READ_OPTIONS,
        ) as mngr:
            step = mngr.best_step() if mngr.best_step() is not None else mngr.latest_step()
            if step is not None:
                out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
                return out["params"]
    with _state_manager(workdir, _READ_OPTIONS) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{workdir} holds no checkpoint; train first or check the path.")
        meta = mngr.item_metadata(step)["state"].tree  # dict keys come back as strings
        state_target = _placed(meta, placement)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_target)))["state"]
        return _conform(target, _merged(state["params"], state.get("batch_stats", {})))


def _placed(tree: Any, placement: Placement | None) -> Any:
    """``ShapeDtypeStruct`` s of ``tree``'s leaves in the shardings of ``placement`` (None: this host's device 0)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    if placement is None:  # host-local, whatever topology saved the checkpoint
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: local, shapes)
    else:
        shardings = placement(shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _merged(a: Any, b: Any) -> Any:
    """Two nested dicts with disjoint leaves as one (``params`` and ``batch_stats`` of one model)."""
    if not isinstance(b, dict) or not b:
        return a
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if k in out else v
    return out


def _conform(like: Any, tree: Any) -> Any:
    """``tree`` re-keyed like ``like`` (orbax metadata turns int dict keys into strings)."""
    if isinstance(like, dict):
        return {k: _conform(v, tree[k] if k in tree else tree[str(k)]) for k, v in like.items()}
    return tree
