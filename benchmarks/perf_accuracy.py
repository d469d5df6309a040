"""Accuracy of tokenfab.perf against every `measured` tok/s row of anchors.csv, before and after calibration.

Calibration fits the named efficiencies on half the rows (every other one) and is scored on the
other half (held out); then the halves swap (fit on the held-out half, score the other), and a
4-fold cross-validation predicts every scored row from a fit on the other three quarters. The table
shows every row with the default efficiencies, with the first split's fit, and its cross-validated
error. The defaults are themselves a fit on all scored rows, so their column is in-sample: the
held-out columns are the test.

The rows come from two kinds of source, and each is also calibrated on its own (its train half, scored
on its held-out half, then swapped, and a 4-fold cross-validation within it): online serving
benchmarks at a stated token speed (InferenceX, vendor posts, AIConfigurator) and TensorRT-LLM's perf
overview (offline maximum throughput, one stack).
That is the use `tokenfab calibrate` is for: fit a stack's efficiencies on some of its measurements,
then predict the rest.

`--by-model` instead calibrates each model of each kind of source on its own rows (groups of at least
eight): one deployment's model measured across parts and lengths, the finest calibration a user has.

    python benchmarks/perf_accuracy.py
    python benchmarks/perf_accuracy.py --by-model
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys

from tokenfab.perf.calibrate import calibrate, errors, load_anchors, mode_for, scorable, split
from tokenfab.perf.catalog import Catalog
from tokenfab.perf.model import Efficiency


def group(row) -> str:
    return "TensorRT-LLM perf overview" if "perf overview" in row.label else "serving benchmarks"


def med(es: list[float]) -> float:
    return statistics.median(abs(e) for e in es)


def cv_errors(cat, rows, base) -> dict:
    """4-fold cross-validation: each row's error from a fit on the other three quarters, by row id."""
    out = {}
    for i in range(4):
        fold = rows[i::4]
        fit = calibrate(cat, [r for r in rows if r not in fold], base)
        out.update({id(r): e for r, e in zip(fold, errors(cat, fold, fit))})
    return out


def by_model(cat, rows, base) -> int:
    """Each (kind of source, model) with at least eight scored rows calibrated on itself: every other row
    held out, the halves swapped, and a 4-fold cross-validation within the group."""
    rows = scorable(cat, rows, base)
    out, cv_all = {}, []
    print("| kind of source | model | rows | held out | swapped | 4-fold CV |")
    print("|---|---|---|---|---|---|")
    for g, model in sorted({(group(r), r.model) for r in rows}):
        rs = [r for r in rows if group(r) == g and r.model == model]
        if len(rs) < 8:
            continue
        tr, he = split(rs)  # the same every-other split as the all-rows fits, within the group
        held = med(errors(cat, he, calibrate(cat, tr, base)))
        swapped = med(errors(cat, tr, calibrate(cat, he, base)))
        cv = list(cv_errors(cat, rs, base).values())
        cv_all += cv
        out[f"{g} / {model}"] = {"rows": len(rs), "median_abs_error_heldout_calibrated": held,
                                 "median_abs_error_swapped_split_heldout": swapped, "median_abs_error_4fold_cv": med(cv)}
        print(f"| {g} | {model} | {len(rs)} | {held:.1%} | {swapped:.1%} | {med(cv):.1%} |", flush=True)
    print()
    print(json.dumps({"groups": out, "rows_cross_validated": len(cv_all),
                      "median_abs_error_4fold_cv_all_groups": med(cv_all)}, indent=2))
    return 0


def main() -> int:
    cat = Catalog.default()
    rows = load_anchors()
    if "--by-model" in sys.argv[1:]:
        return by_model(cat, rows, Efficiency())
    train, held = split(rows, cat)
    base = Efficiency()
    fitted = calibrate(cat, train, base)
    e0, e1 = errors(cat, rows, base), errors(cat, rows, fitted)
    swapped = calibrate(cat, held, base)
    e2 = errors(cat, rows, swapped)
    scored_rows = train + held
    cv_by_row = cv_errors(cat, scored_rows, base)  # every row predicted by a fit without it
    cv = list(cv_by_row.values())
    by_group = {}  # each kind of source calibrated on its own half, scored on its other half, and swapped
    for g in sorted({group(r) for r in scored_rows}):
        tr, he = [r for r in train if group(r) == g], [r for r in held if group(r) == g]
        fit_g, fit_gs = calibrate(cat, tr, base), calibrate(cat, he, base)
        cv_g = cv_errors(cat, [r for r in scored_rows if group(r) == g], base)
        by_group[g] = {"rows": len(tr) + len(he),
                       "median_abs_error_default": med(errors(cat, tr + he, base)),
                       "median_abs_error_heldout_calibrated": med(errors(cat, he, fit_g)),
                       "median_abs_error_swapped_split_heldout": med(errors(cat, tr, fit_gs)),
                       "median_abs_error_4fold_cv": med(list(cv_g.values())),
                       "fitted": dataclasses.asdict(fit_g), "fitted_swapped": dataclasses.asdict(fit_gs)}
    print("| row | hardware | model | precision | ISL/OSL | at tok/s/user | metric | measured | predicted (default, in-sample) "
          "| error | predicted (calibrated) | error | split | error, 4-fold CV |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, a, b in zip(rows, e0, e1):
        where = "train" if r in train else "held out" if r in held else \
            "not scored: no token speed stated" if not r.comparable else \
            "not scored: does not fit one scale-up domain (the model serves a replica within one)"
        print(f"| {r.label} | {r.hardware} | {r.model} | {r.precision} | {r.isl}/{r.osl} | {r.at_tok_s_user or 'max'} "
              f"| {r.metric} ({mode_for(r)}) | {r.value:,.0f} | {r.value * (1 + a):,.0f} | {a:+.0%} | "
              f"{r.value * (1 + b):,.0f} | {b:+.0%} | {where} | "
              f"{format(cv_by_row[id(r)], '+.0%') if id(r) in cv_by_row else 'n/a'} |")

    held_idx = [i for i, r in enumerate(rows) if r in held]
    scored = [i for i, r in enumerate(rows) if r in train or r in held]
    summary = {
        "rows_scored": len(scored), "rows_train": len(train), "rows_held_out": len(held),
        "median_abs_error_all_default": med([e0[i] for i in scored]),
        "median_abs_error_all_calibrated": med([e1[i] for i in scored]),
        "median_abs_error_heldout_default": med([e0[i] for i in held_idx]),
        "median_abs_error_heldout_calibrated": med([e1[i] for i in held_idx]),
        "median_abs_error_swapped_split_heldout": med([e2[i] for i, r in enumerate(rows) if r in train]),
        "median_abs_error_4fold_cv": med(cv),
        "by_source_kind": by_group,
        "fitted": dataclasses.asdict(fitted), "fitted_swapped": dataclasses.asdict(swapped),
        "default": dataclasses.asdict(base),
    }
    print()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
