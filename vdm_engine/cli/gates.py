"""``vdm-gates list | remove MODEL``: the local gates registry (and the gates shipped with the package)."""

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
        "find by model name: registry entries ($VDM_GATES_HOME) first, then the gates shipped with the package.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,remove}")
    ls = sub.add_parser("list", help="registry entries and shipped gates, with their sha256 and kept fraction")
    ls.add_argument("--json", action="store_true", help="one JSON object with the registry home and the entries")
    rm = sub.add_parser("remove", help="delete MODEL's registry entry (its shipped gates, if any, are used again)")
    rm.add_argument("model", metavar="MODEL", help="model name or registry key, as `vdm-gates list` shows it")
    rm.add_argument("--json", action="store_true", help="report as one JSON object")
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


def _run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _list(args.json)
    return _remove(args.model, args.json)


def main(argv=None) -> int:
    from vdm_engine.cli._common import run_cli

    return run_cli(PROG, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
