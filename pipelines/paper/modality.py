"""The modality study section (the paper's Table 6): one poisoned set trained with each tower unfrozen."""

from __future__ import annotations

from mmsanitize.metrics import HIT_KS
from mmsanitize.report import markdown_table

from .folders import load, rel, t2i, utility
from .paper_values import paper_rows, paper_source
from .plan import Plan


def modality_rows(plan: Plan) -> list[dict]:
    """M^0 (REF on the poisoned set's queries), the projections-only model and every configured run,
    each with Hit@K, MinRank, utility R@10 and its folder (rows not run yet are left out)."""
    m = plan.cfg.modality
    r = plan.run_dir(m.dataset, m.experiment)
    goal = m.goal
    models = [("M^0: REF (never saw poison)", r / "ref_metrics.json"),
              (f"M_p(proj): projections only ({' '.join(plan.cfg.train_args)})", r / "metrics.json")]
    models += [(run.label, plan.modality_dir(m, run.name) / "metrics.json") for run in m.runs]
    rows = []
    for label, path in models:
        metrics = load(path)
        if not metrics:
            continue
        t, u = t2i(metrics, goal), utility(metrics)
        rows.append({"model": label, **{f"Hit@{k}": t.get(f"hit@{k}") for k in HIT_KS},
                     "MinRank": t.get("min_rank_mean"), "t2i R@10": u.get("t2i_r@10"), "i2t R@10": u.get("i2t_r@10"),
                     "from": rel(path, plan.w)})
    return rows


def sec_modality(plan: Plan) -> list[str]:
    """The markdown of the modality study, or [] when the config has none."""
    m = plan.cfg.modality
    if m is None:
        return []
    L = [f"## Modality study (Table 6): {m.dataset} {m.experiment} with whole towers trained", ""]
    if m.notes:
        L += [m.notes.strip(), ""]
    rows = modality_rows(plan)
    if not rows:
        return L + ["Not run yet.", ""]
    missing = [run.label for run in m.runs if not load(plan.modality_dir(m, run.name) / "metrics.json")]
    L += markdown_table(rows + paper_rows(plan.cfg, "modality")) + [""]
    if missing:
        L += ["Not run yet: " + "; ".join(missing) + ".", ""]
    return L + ([paper_source(plan.cfg, "modality"), ""] if plan.cfg.paper.get("modality") else [])
