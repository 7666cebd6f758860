"""Fit the trap cases with an installed bigmixed and record what it finds.

usage (from the repository root):
    python scripts/bigmixed_traps.py [--bigmixed-path DIR] [--out tests/data/traps/bigmixed_0_1.json]

--bigmixed-path puts DIR first on sys.path (e.g. an unpacked `git archive <commit> bigmixed` tree),
so a given commit can be measured while the working tree changes. The committed
tests/data/traps/bigmixed_0_1.json was made from commit d58e879 (bigmixed 0.1.0), the code the
traps were chosen against; scripts/ref_traps.R merges it into tests/data/lme4/traps.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bigmixed-path", default=None)
    ap.add_argument("--commit", default=None, help="commit label to record (default: git HEAD of --bigmixed-path or the repo)")
    ap.add_argument("--out", default=str(DATA / "traps" / "bigmixed_0_1.json"))
    args = ap.parse_args(argv)
    if args.bigmixed_path:
        sys.path.insert(0, str(pathlib.Path(args.bigmixed_path).resolve()))
    import numpy as np
    import pandas as pd
    import bigmixed as bm

    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            commit = None
    cases = json.loads((DATA / "traps" / "cases.json").read_text())["cases"]
    fits = {}
    for name, c in cases.items():
        d = pd.read_csv(DATA / c["data"], dtype={f: str for f in c["factors"]})
        for reml in (True, False):
            key = name if reml else f"{name}_ml"
            rec = {"formula": c["bigmixed_formula"], "REML": reml}
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    r = bm.lmer(c["bigmixed_formula"], d, REML=reml)
                rec.update(llf=float(r.llf), theta=[float(t) for t in np.atleast_1d(r.theta)],
                           singular=bool(r.is_singular), sigma=float(r.sigma),
                           fixef={k: float(v) for k, v in dict(r.fixef).items()},
                           warnings=sorted({str(x.message) for x in w}))
            except Exception as e:  # noqa: BLE001
                rec.update(error=f"{type(e).__name__}: {e}")
            fits[key] = rec
            print(key, rec.get("llf"), rec.get("singular"), rec.get("theta"), rec.get("error", ""))
    out = {"generated_by": "scripts/bigmixed_traps.py", "bigmixed_version": getattr(bm, "__version__", None),
           "bigmixed_from": "the tree given with --bigmixed-path" if args.bigmixed_path else "the installed package", "commit": commit,
           "call": "bigmixed.lmer(formula, frame, REML=REML), factor columns read as str", "fits": fits}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
