"""``vdm-gates list | remove MODEL | stack DIR DIR ... --out DIR``: the local gates registry (and the gates
shipped with the package); K-level gates for the one-pass ranking (``patch_rank``) from single-level ones."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]

PROG = "vdm-gates"


def build_parser() -> argparse.ArgumentParser:
    from vdm_engine.cli._common import CliParser

    p = CliParser(
        prog=PROG,
        description="Show or remove the gates that Explainer.from_pretrained(MODEL), vdm-explain and vdm-export "
        "find by model name: registry entries ($VDM_GATES_HOME) first, then the gates shipped with the package; "
        "join single-level gates into K-level gates (stack).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,remove,stack}")
    ls = sub.add_parser("list", help="registry entries and shipped gates, with their sha256 and kept fraction")
    ls.add_argument("--json", action="store_true", help="one JSON object with the registry home and the entries")
    rm = sub.add_parser("remove", help="delete MODEL's registry entry (its shipped gates, if any, are used again)")
    rm.add_argument("model", metavar="MODEL", help="model name or registry key, as `vdm-gates list` shows it")
    rm.add_argument("--json", action="store_true", help="report as one JSON object")
    st = sub.add_parser("stack", help="join single-level gates of one backbone (vdm-train --eps E --no-register, one "
                                      "run per budget) into K-level gates for patch_rank / diffmask-path")
    st.add_argument("levels", nargs="+", metavar="DIR",
                    help="gates folders (a vdm-train run's gates/), least sparse (smallest --eps) first")
    st.add_argument("--out", required=True, metavar="DIR", help="folder for the K-level gates (new, or empty)")
    st.add_argument("--main-level", type=int, default=0, metavar="K",
                    help="the level whose mask is patch_mask (default 0: the first DIR)")
    st.add_argument("--overwrite", action="store_true", help="replace gates already in --out")
    st.add_argument("--json", action="store_true", help="report as one JSON object")
    return p


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _list(as_json: bool) -> int:
    import json

    from vdm_engine.registry import list_gates, registry_home

    entries = list_gates()
    if as_json:
        print(json.dumps({"registry": str(registry_home()), "gates": [e.to_dict() for e in entries]}))
        return 0
    print(f"registry: {registry_home()}")
    rows = [("MODEL", "SOURCE", "IN USE", "KEPT", "AGREE", "SHA256", "BACKBONE", "PATH")]
    for e in entries:
        rows.append((
            e.model, e.source, "yes" if e.in_use else "no (hidden by registry)", _pct(e.kept), _pct(e.agreement),
            (e.sha256 or "-")[:12], e.backbone or "-", e.path + (f"  [{e.error}]" if e.error else ""),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _remove(model: str, as_json: bool) -> int:
    import json

    from vdm_engine.registry import registered_gates, remove_gates

    removed = remove_gates(model)
    now = registered_gates(model)
    if as_json:
        print(json.dumps({"model": model, "removed": str(removed), "now_uses": str(now) if now else None}))
    else:
        after = f"'{model}' now uses {now}" if now else f"'{model}' has no gates now"
        print(f"removed {removed}; {after}")
    return 0


def _stack(args) -> int:
    """Load each single-level gates folder, join them with ``Gates.stack``, write them to ``--out``."""
    import json
    from pathlib import Path

    from vdm_engine._io import atomic_path
    from vdm_engine.cli._common import UsageError, check_out_dir

    if len(args.levels) < 2:
        raise UsageError(f"stack needs at least 2 gates folders, got {len(args.levels)}")
    if not 0 <= args.main_level < len(args.levels):
        raise UsageError(f"--main-level must be in [0, {len(args.levels)}) for {len(args.levels)} folders, "
                         f"got {args.main_level}")
    out = check_out_dir(args.out)
    from vdm_engine.gates import GATES_CONFIG, GATES_WEIGHTS, ZERO_SHOT_WEIGHTS, Gates

    if not args.overwrite and any((out / n).exists() for n in (GATES_CONFIG, GATES_WEIGHTS)):
        raise UsageError(f"--out {out} already holds gates; pass --overwrite to replace them")
    levels = [Gates.from_pretrained(d) for d in args.levels]  # ValueError: not a gates folder, or corrupt
    stacked = Gates.stack(levels, main_level=args.main_level)  # ValueError: another shape or backbone
    stacked.metrics = {**stacked.metrics, "stacked_from": [{"path": str(Path(d).resolve()), "sha256": g.sha256}
                                                           for d, g in zip(args.levels, levels)]}
    out.mkdir(parents=True, exist_ok=True)
    if stacked.backbone_zero_shot:  # a CLIP head: its text embeddings travel with the gates
        with atomic_path(out / ZERO_SHOT_WEIGHTS) as tmp:
            tmp.write_bytes((Path(args.levels[0]) / ZERO_SHOT_WEIGHTS).read_bytes())
    stacked.save_pretrained(out)
    written = Gates.from_pretrained(out)
    rows = [{"path": str(d), "eps": g.level_budgets()[0], "kept": g.provenance.kept} for d, g in zip(args.levels, levels)]
    if args.json:
        print(json.dumps({"out": str(out), "levels": rows, "main_level": args.main_level, "sha256": written.sha256,
                          "backbone": written.backbone_id}))
        return 0
    print(f"wrote {out}: {len(rows)} levels of {written.backbone_id} (sha256 {written.sha256[:12]}...), "
          f"main level {args.main_level}")
    for i, r in enumerate(rows):
        print(f"  level {i}: eps {r['eps'] if r['eps'] is not None else '-'}  kept {_pct(r['kept'])}  {r['path']}")
    return 0


def _run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _list(args.json)
    if args.command == "stack":
        return _stack(args)
    return _remove(args.model, args.json)


def main(argv=None) -> int:
    from vdm_engine.cli._common import run_cli

    return run_cli(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
