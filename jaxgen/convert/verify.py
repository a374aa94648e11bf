"""Golden check: convert a reference fixture's weights, run its inputs through jaxgen, compare with its outputs.

    python -m jaxgen.convert.verify --family var FIXTURE.npz [--dump OUT.npz] [--scan-layers]

The model config comes from the `.json` beside the npz. Prints a JSON report (per output key: max abs diff, or exact
match for integer outputs) and exits 0 only if every integer output matches exactly and every float output is within
`--atol` * max(1, |reference|). `--scan-layers` runs the generator as one scanned layer (`scan_layers=True`, the
converted params stacked) for the families whose generator has the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxgen.convert.common import load_state_dict
from jaxgen.eval.golden import eval_reference, run_eval_fixture
from jaxgen.families import FAMILIES


def fixture_outputs(fixture: Path, meta: dict) -> dict[str, np.ndarray]:
    """The reference a golden run is compared with by default: every `out/<name>` tensor of the npz."""
    return load_state_dict(fixture, "out/")


@dataclasses.dataclass(frozen=True)
class GoldenCheck:
    run: Callable[[Path, dict], dict]  # (fixture npz, its json) -> jaxgen's outputs by name
    reference: Callable[[Path, dict], dict] = fixture_outputs  # ... -> the reference outputs by name
    per_array: bool = False  # tolerance relative to each array's largest value, not to each element

    @property
    def scans(self) -> bool:
        """Whether `run` takes `scan_layers` (the family's generator can run as one scanned layer)."""
        return "scan_layers" in inspect.signature(self.run).parameters


# One per family with a golden hook, plus the evaluator (Inception + FID / IS / precision-recall).
GOLDEN = {name: GoldenCheck(family.golden) for name, family in FAMILIES.items() if family.golden is not None}
# The eval fixture's README: |port - ref| <= 1e-4 * max(1, max |ref array|) (logits of magnitude ~160 move by 3e-4
# between torch thread counts).
GOLDEN["eval"] = GoldenCheck(run_eval_fixture, eval_reference, per_array=True)


def compare(
    ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], atol: float, per_array: bool = False
) -> tuple[bool, dict]:
    """Per-key report; integers must match exactly, floats within atol * max(1, |ref|) element by element, or
    with `per_array` within atol * max(1, max |ref array|)."""
    report, ok = {}, True
    for name, ref in reference.items():
        if name not in ours:
            report[name] = {"ok": False, "error": "not produced"}
            ok = False
            continue
        got = np.asarray(ours[name])
        if got.shape != ref.shape:
            report[name] = {"ok": False, "error": f"shape {list(got.shape)} != reference {list(ref.shape)}"}
            ok = False
        elif np.issubdtype(ref.dtype, np.integer):
            mismatches = int(np.sum(got != ref))
            report[name] = {"ok": mismatches == 0, "exact_match": mismatches == 0, "mismatches": mismatches}
        else:
            got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
            with np.errstate(invalid="ignore"):  # inf - inf: equal infinities (e.g. MaskGIT's known-token
                diff = np.where(got64 == ref64, 0.0, np.abs(got64 - ref64))  # confidence) match, others are NaN
            scale_ref = np.where(np.isfinite(ref), np.abs(ref), 0.0)
            scale = scale_ref.max(initial=0.0) if per_array else scale_ref
            worst = float(np.max(diff / np.maximum(1.0, scale))) if diff.size else 0.0
            report[name] = {
                "ok": worst <= atol,
                "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                "max_scaled_diff": worst,
            }
        ok &= report[name]["ok"]
    return ok, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxgen.convert.verify", description=__doc__.split("\n")[0])
    parser.add_argument("fixture", type=Path, help="fixture .npz (its .json must sit beside it)")
    parser.add_argument("--family", required=True, choices=sorted(GOLDEN))
    parser.add_argument("--dump", type=Path, help="write jaxgen's outputs here as out/<name> (same shapes)")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--scan-layers", action="store_true", help="run the generator with scan_layers=True")
    args = parser.parse_args(argv)
    meta_path = args.fixture.with_suffix(".json")
    if not args.fixture.is_file() or not meta_path.is_file():
        parser.error(f"need both {args.fixture} and {meta_path}")
    jax.config.update("jax_default_matmul_precision", "highest")
    meta = json.loads(meta_path.read_text())
    check = GOLDEN[args.family]
    if args.scan_layers and not check.scans:
        parser.error(f"--scan-layers: family {args.family!r} has no scanned layout; the scanning ones: "
                     f"{sorted(n for n, c in GOLDEN.items() if c.scans)}")  # fmt: skip
    ours = check.run(args.fixture, meta, scan_layers=True) if args.scan_layers else check.run(args.fixture, meta)
    reference = check.reference(args.fixture, meta)
    ok, report = compare(ours, reference, args.atol, per_array=check.per_array)
    if args.dump:
        dtypes = {k: v.dtype for k, v in reference.items()}
        dump = {f"out/{k}": np.asarray(v, dtypes.get(k, v.dtype)) for k, v in ours.items()}
        dump.update({k: np.asarray(v) for k, v in ours.items() if k.startswith("metrics/")})  # also unprefixed
        np.savez(args.dump, **dump)
    print(
        json.dumps(
            {
                "fixture": str(args.fixture),
                "family": args.family,
                "scan_layers": args.scan_layers,
                "ok": ok,
                "atol": args.atol,
                "outputs": report,
            },
            indent=1,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
