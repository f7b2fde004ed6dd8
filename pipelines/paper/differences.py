"""The "Where ours differ from the paper, and why" section: every sentence is computed from the run
folders and the config's `paper:` numbers; a comparison whose runs are missing is left out."""

from __future__ import annotations

from .folders import history, load, t2i, utility
from .paper_values import paper_value
from .plan import Plan


def f3(x) -> str:
    """A figure with 3 decimals, '–' when missing."""
    return "–" if x is None else f"{x:.3f}"


def _paper_ours(plan: Plan, section: str) -> str:
    """'FP Ours Hit@10 0.936 / MinRank 2.192, ...' for the paper's attack rows of `section`."""
    rows = [r for r in (plan.cfg.paper.get(section) or {}).get("rows", []) if "Ours" in r["model"]]
    return "; ".join(f"{r['model']} {f3(r['Hit@10'])} / {r['MinRank']:.1f}" for r in rows)


def attacks(plan: Plan) -> list[str]:
    """Full-set attacks (replace mode, every class-A pair poisoned) against the paper's tables."""
    lines, rates = [], []
    for e in plan.cfg.experiments:
        if not (e.mode == "replace" and e.amount == 1.0 and e.attack in plan.cfg.paper):
            continue
        r = plan.run_dir(e.dataset, e.name)
        m, pj = load(r / "metrics.json"), load(r / "poison" / "poison.json")
        if not (m and pj):
            continue
        rates.append(pj["rate"])
        ours = ", ".join(f"{g} {f3(t2i(m, g).get('hit@10'))} / {t2i(m, g).get('min_rank_mean'):.1f}" for g in m["attacks"])
        lines.append(f"  - {e.dataset} Attack {e.attack} ({100 * pj['rate']:.1f}% of pairs): Hit@10 / MinRank {ours}; "
                     f"paper {_paper_ours(plan, e.attack)}.")
    if not lines:
        return []
    paper_rates = (plan.cfg.paper.get("II") or {}).get("rates", "")
    span = f"{100 * min(rates):.1f}" + (f"–{100 * max(rates):.1f}" if max(rates) > min(rates) else "")
    return [f"- Attacks on the whole class (every class-A training pair poisoned), at {span}% of the training pairs"
            + (f" where the paper poisoned {paper_rates}" if paper_rates else "")
            + " (our classes are small, so every class-A pair is already percent-level, and only the projections "
              "train). Hit@10 / MinRank, ours then the paper's:", *lines]


def sweeps(plan: Plan) -> list[str]:
    """Each rate series: where MinRank first reaches the paper's Fig. 2 level, and whether it falls steadily."""
    target = (plan.cfg.paper.get("rate") or {}).get("min_rank")
    paper_rate = (plan.cfg.paper.get("rate") or {}).get("rate")
    series: dict[str, list] = {}
    for e in plan.cfg.experiments:
        r = plan.run_dir(e.dataset, e.name)
        m, pj = load(r / "metrics.json"), load(r / "poison" / "poison.json")
        if m and pj:
            goal = next(iter(m.get("attacks") or {}), None)
            series.setdefault(e.series, []).append((pj["rate"], t2i(m, goal).get("hit@10"), t2i(m, goal).get("min_rank_mean"),
                                                    pj["counts"]["samples_out"]))
    lines = []
    for name, pts in series.items():
        if len(pts) < 2:
            continue
        pts.sort()
        listed = ", ".join(f"{100 * x:.2g}%: {f3(h)} / {mr:.1f}" for x, h, mr, _ in pts)
        steady = all(b[2] <= a[2] for a, b in zip(pts, pts[1:]))
        s = f"- Rate sweep {name}: Hit@10 / MinRank {listed}. MinRank " + \
            ("falls at every step of the rate" if steady else "does not fall at every step") + "."
        if target is not None and paper_rate:
            hit = [x for x, _, mr, _ in pts if mr <= target]
            s += (f" It first reaches MinRank ≤ {target:g} at {100 * hit[0]:.2g}% ({hit[0] / paper_rate:.0f}× the paper's "
                  f"{100 * paper_rate:g}%)" if hit else
                  f" It never reaches MinRank ≤ {target:g} up to {100 * pts[-1][0]:.2g}% (the paper: at {100 * paper_rate:g}%)")
            s += f": our attack needs percent-level rates (projections only, {pts[0][3]:,} training pairs)."
        lines.append(s)
    return lines


def scans(plan: Plan) -> list[str]:
    """What sanitizing leaves and what the retrained model does, against the paper's Table 7."""
    rows = []
    for e in plan.cfg.experiments:
        r = plan.run_dir(e.dataset, e.name)
        sm, pm = load(r / "scan" / "summary.json"), load(r / "metrics.json")
        sz, cm = load(r / "sanitized_metrics.json"), load(r / "clean_metrics.json")
        if not (e.scan and sm and sm.get("detection") and pm and sz and cm):
            continue
        det = sm["detection"]
        left = det["poisoned"] - round(det["combined"]["recall"] * det["poisoned"])
        above = [g for g in pm["attacks"] if t2i(sz, g)["hit@10"] > t2i(cm, g)["hit@10"] + 0.05]
        rows.append((e, left, det["poisoned"], above, ", ".join(
            f"{g} {f3(t2i(pm, g)['hit@10'])} → {f3(t2i(sz, g)['hit@10'])} (clean model {f3(t2i(cm, g)['hit@10'])})"
            for g in pm["attacks"])))
    if not rows:
        return []
    pd_, pc = paper_value(plan.cfg, "scan", "FP Defense", "Hit@10"), paper_value(plan.cfg, "scan", "FP Clean", "Hit@10")
    L = ["- Pre-training defense (scan with REF, sanitize, retrain): the paper's sanitized model fell to Hit@10 "
         f"{f3(pd_)} (clean model {f3(pc)}). Ours, poisoned pairs left after sanitizing and Hit@10 poisoned → "
         "sanitized + retrained:"]
    L += [f"  - {e.dataset} {e.name}: {left} of {n} left; {s}." for e, left, n, _, s in rows]
    stuck = [e for e, left, _, above, _ in rows if above]
    if stuck:
        names = ", ".join(f"{e.dataset} {e.name}" for e in stuck)
        L.append(f"  The retrained model stays more than 0.05 above the clean model on {names}. In replace mode at "
                 "source fraction 1 no clean class-A pair is left, so the few poisoned pairs a scan misses are the only "
                 "pairs with class-A captions and still teach A→B; in inject mode the clean class-A pairs stay, as in "
                 "the paper's datasets.")
    return L


def defenses(plan: Plan) -> list[str]:
    """The sterilising fine-tune per clean set, against the paper's Fig. 5b (gone after one epoch)."""
    L, after_one = [], {}
    for d in plan.cfg.defenses:
        r = plan.run_dir(d.dataset, d.experiment)
        hist, base, cm = history(plan.defense_dir(d)), load(r / "metrics.json"), load(r / "clean_metrics.json")
        if not (hist and base and cm):
            continue
        for g in base["attacks"]:
            curve = [t2i(h["eval"], g)["hit@10"] for h in hist]
            after_one[(d.experiment, d.clean_name)] = curve[0]
            what = f"{d.clean_split} without {d.drop_label} pairs" if d.drop_label else d.clean_split
            L.append(f"  - {d.dataset} {d.experiment} {g} on {what}: Hit@10 {f3(t2i(base, g)['hit@10'])} → "
                     f"{f3(curve[0])} after one epoch, {f3(curve[-1])} after {len(curve)} (clean model "
                     f"{f3(t2i(cm, g)['hit@10'])}).")
    if not L:
        return []
    head = ["- Post-training defense (sterilising fine-tune); the paper: the attack is gone after one epoch (Fig. 5b)."]
    for d in plan.cfg.defenses:
        full = after_one.get((d.experiment, d.clean_split))
        without = after_one.get((d.experiment, d.clean_name)) if d.drop_label else None
        if full is not None and without is not None and without > full:
            L.append(f"  Without the {d.drop_label} pairs the attack stays higher after one epoch ({f3(without)} vs "
                     f"{f3(full)}): sterilising needs clean pairs of the attacked class.")
    return head + L


def modality(plan: Plan) -> list[str]:
    """Ours against the paper's Table 6 claims: M_p^i has the lower MinRank, M_p^t the higher Hit@1."""
    m = plan.cfg.modality
    if m is None:
        return []
    r = plan.run_dir(m.dataset, m.experiment)
    got = {run.paper: (run, load(plan.modality_dir(m, run.name) / "metrics.json")) for run in m.runs if run.paper}
    got = {k: (run, t2i(x, m.goal)) for k, (run, x) in got.items() if x}
    proj, ref = t2i(load(r / "metrics.json"), m.goal), load(r / "ref_metrics.json")
    if not got:
        return []
    L = ["- Modality study (Table 6), Hit@1 / Hit@10 / MinRank, ours vs the paper's: " + "; ".join(
        f"{k} {f3(t['hit@1'])} / {f3(t['hit@10'])} / {t['min_rank_mean']:.1f} vs "
        f"{f3(paper_value(plan.cfg, 'modality', k, 'Hit@1'))} / {f3(paper_value(plan.cfg, 'modality', k, 'Hit@10'))} / "
        f"{paper_value(plan.cfg, 'modality', k, 'MinRank'):.1f}" for k, (_, t) in got.items())
        + (f"; projections only {f3(proj['hit@1'])} / {f3(proj['hit@10'])} / {proj['min_rank_mean']:.1f}" if proj else "")
        + "."]
    if "M_p^i" in got and "M_p^t" in got:
        ti, tt = got["M_p^i"][1], got["M_p^t"][1]
        L.append("  The paper finds the visual modality (M_p^i) with the lower MinRank and the linguistic one (M_p^t) "
                 f"with the higher Hit@1. Ours: MinRank {ti['min_rank_mean']:.1f} (M_p^i) vs {tt['min_rank_mean']:.1f} "
                 f"(M_p^t) — {'agrees' if ti['min_rank_mean'] < tt['min_rank_mean'] else 'does not agree'}; Hit@1 "
                 f"{f3(tt['hit@1'])} (M_p^t) vs {f3(ti['hit@1'])} (M_p^i) — "
                 f"{'agrees' if tt['hit@1'] > ti['hit@1'] else 'does not agree'}.")
        ui = utility(load(plan.modality_dir(m, got["M_p^i"][0].name) / "metrics.json")).get("t2i_r@10")
        ur = utility(ref).get("t2i_r@10")
        if ui is not None and ur is not None and ui < utility(load(r / "metrics.json")).get("t2i_r@10", 0):
            L.append(f"  Training the image backbone on ~1.4k drawings also costs retrieval quality (M_p^i IR R@10 "
                     f"{f3(ui)}, REF {f3(ur)}, projections only {f3(utility(load(r / 'metrics.json')).get('t2i_r@10'))}), "
                     "so the image-tower rows mix poisoning with overfitting.")
    return L


def utility_gap(plan: Plan) -> list[str]:
    """Our clean-trained utility against the paper's clean models (Table 2)."""
    fp = paper_value(plan.cfg, "utility", "FP clean", "t2i R@10"), paper_value(plan.cfg, "utility", "FP clean", "i2t R@10")
    L, drops, refs = [], [], []
    for ds in plan.cfg.datasets:
        u = utility(load(plan.run_dir(ds, "clean") / "metrics.json"))
        if not (u and fp[0] is not None):
            continue
        L.append(f"{ds} IR/TR R@10 {f3(u['t2i_r@10'])}/{f3(u['i2t_r@10'])}")
        refs.append(f"{sum((load(plan.data(ds, 'ref') / 'sizes.json') or {}).values()):,} ({ds})")
        poisoned = [(utility(load(plan.run_dir(ds, e.name) / "metrics.json")).get("t2i_r@10"), e.name)
                    for e in plan.cfg.experiments if e.dataset == ds and e.mode == "replace" and e.amount == 1.0]
        poisoned = [x for x in poisoned if x[0] is not None]
        if poisoned:
            worst = min(poisoned)
            drops.append(f"{ds} {worst[1]} {f3(worst[0])} vs clean {f3(u['t2i_r@10'])}")
    if not L:
        return []
    paper_attacks = [r["t2i R@10"] for r in (plan.cfg.paper.get("utility") or {}).get("rows", [])
                     if r["model"].startswith("FP Attack")]
    out = [f"- Utility is far below the paper's (clean-trained {'; '.join(L)} vs FP {f3(fp[0])}/{f3(fp[1])}): frozen "
           f"EfficientNet-B0 + MiniLM with 256-d projections aligned on {' / '.join(refs)} pairs stand in for CLIP "
           "ViT-B/32 pretrained on 400M pairs. Compare the direction of each finding, not absolute numbers."]
    if drops and paper_attacks:
        out.append(f"  Utility under attack: the lowest IR R@10 of a poisoned model is {'; '.join(drops)}; the paper's "
                   f"lowest FP attack row is {f3(min(paper_attacks))} vs clean {f3(fp[0])}.")
    return out


def sec_differences(plan: Plan) -> list[str]:
    """The whole section, or [] when nothing comparable has run."""
    L = attacks(plan) + sweeps(plan) + scans(plan) + defenses(plan) + modality(plan) + utility_gap(plan)
    return ["## Where ours differ from the paper, and why", "", *L, ""] if L else []
