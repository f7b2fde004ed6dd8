"""Render docs/results_detection.md (+ img/detection_*.png) from the outputs of pipelines/detection.py.

Only reads what the verbs wrote under WORK: evaluate's metrics JSON, scan's summary.json and
scores.parquet, poison.json / manifest.parquet, build_report.json, WORK/steps.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

NA = "–"
TARGET_AUROC, TARGET_RECALL, TARGET_CLEAN_REMOVED, TARGET_HIT, TARGET_UTIL = 0.95, 0.9, 0.05, 0.05, 0.02
TARGET_SHIPPED, TARGET_DENSITY = 0.98, 0.95
IMAGES = {"fresh": "fresh (pool)", "reencode": "pool, re-encoded", "crop": "pool, cropped", "same-dataset": "same-dataset",
          "trigger": "trigger"}


def load(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None


def f3(x) -> str:
    return NA if x is None else f"{x:.3f}"


def pct(x) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


def mark(ok) -> str:
    return NA if ok is None else ("✓" if ok else "✗")


def hit10(m: dict | None, goals=None) -> float | None:
    """Mean text→image Hit@10 over the dirty-label goals of an evaluate JSON."""
    att = (m or {}).get("attacks") or {}
    vals = [a["t2i"]["hit@10"] for a in att.values() if isinstance(a, dict) and a.get("t2i")]
    return sum(vals) / len(vals) if vals else None


def util(m: dict | None, d: str) -> float | None:
    return ((m or {}).get("utility") or {}).get(f"{d}_r@10")


def scan_numbers(scan_dir: Path, manifest: Path) -> dict:
    """AUROC / recall at the scan's own cut (summary.json), and from scores.parquet + manifest: the
    fraction of clean pairs the cut removed and the recall at the cut removing 5% of clean pairs."""
    s = load(scan_dir / "summary.json")
    if not s:
        return {}
    det = s.get("detection") or {}
    comb = det.get("combined") or {}
    out = {"auroc": comb.get("auroc"), "recall": comb.get("recall"), "poisoned": det.get("poisoned"),
           "flagged": s.get("flagged"), "samples": s.get("samples"), "detectors": {}}
    for k, v in det.items():
        if isinstance(v, dict) and k != "combined":
            out["detectors"][k] = v.get("auroc")
    try:
        import numpy as np
        import pandas as pd
        sc = pd.read_parquet(scan_dir / "scores.parquet", columns=["key", "combined", "flagged"])
        truth = sc["key"].isin(set(pd.read_parquet(manifest, columns=["key"])["key"])).to_numpy()
        clean, pois = sc["combined"].to_numpy()[~truth], sc["combined"].to_numpy()[truth]
        flagged = sc["flagged"].to_numpy().astype(bool)
        out["clean_removed"] = float(flagged[~truth].mean()) if (~truth).any() else None
        if len(clean) and len(pois):
            srt = np.sort(clean)[::-1]
            thr = srt[int(np.floor(TARGET_CLEAN_REMOVED * len(srt)))]  # flag > thr removes ≤ 5% of clean
            out["recall_at_5pct"] = float((pois > thr).mean())
            out["clean_at_5pct"] = float((clean > thr).mean())
    except Exception as e:  # noqa: BLE001 - a missing/odd parquet only blanks two cells
        out["error"] = f"{type(e).__name__}: {e}"
    return out


class Report:
    def __init__(self, plan, times: dict, out: Path, img: Path):
        self.p, self.times, self.out, self.img = plan, times, Path(out), Path(img)
        self.w = plan.w

    def rel(self, s) -> str:
        return str(s).replace(str(self.w), "WORK")

    # ----------------------------------------------------------------- sections
    def header(self) -> list[str]:
        from detection import ALIGN, BACKDOOR_MIN_COUNT, GOALS, SPLITS, TRAIN
        P = self.p
        L = ["# Detection of web-style poisons and backdoors (issue 13's targets)", "",
             "Written by `pipelines/detection.py` (renderer `pipelines/detection_report.py`) from the JSON/parquet "
             "outputs under its `--work` folder; **do not edit by hand** — rerun with `--report-only` instead.", ""]
        if P.quick:
            L += ["**Quick smoke run (`--quick`)**: fm only, Attack II fresh 5% + one backdoor, "
                  f"{P.epochs} training epochs. Numbers are not the measurement.", ""]
        L += ["## Setup", "",
              f"Everything was made from nothing under WORK: `mmsanitize datasets build ... --splits {SPLITS}` "
              "(train and test identical to the standard build; `pool` = images the attacker brings, in no other split), "
              "the reference encoder REF per dataset by `mmsanitize align` on the `ref` split "
              f"({'; '.join(f'{d}: `' + ' '.join(map(str, ALIGN[d])) + '`' for d in P.datasets)}), "
              f"and every model by `mmsanitize train --init REF {' '.join(TRAIN)} --epochs {P.epochs} --seed 0` "
              "(projections only, lr 1e-3, batch 128). All poisons are `--mode inject`: every clean pair stays and "
              "the poisoned pairs are added, `--rate` = poisoned / all pairs.", ""]
        rows = []
        for ds in P.datasets:
            b = load(P.data(ds) / "build_report.json")
            if b:
                c = b["counts"]
                rows.append(f"| {ds} | " + " | ".join(f"{sum(c.get(s, {}).values()):,}" for s in ("ref", "pool", "train", "test"))
                            + f" | {len(c.get('train', {}))} |")
        if rows:
            L += ["| dataset | ref | pool | train | test | classes |", "|---|---|---|---|---|---|"] + rows + [""]
        L += ["Goals (held out: no measurement in the other docs uses them): "
              + "; ".join(f"{ds} `{GOALS[ds][0]}` (Attack II, Attack III's first) and `{GOALS[ds][1]}` "
                          "(Attack I, Attack III's second)" for ds in P.datasets)
              + (". Both goals for both attacks (`--goals all`)." if P.goals_all else "."),
              *(["The detectors, the `auto` rule and the combination were chosen on development goals only: fm "
              "`trouser2sneaker` and oca `computer2flag` (docs/scanning.md). oca `person2flag` at 1% is an extra set "
              "whose 14 pool images never repeat (person2fruit's pool holds only 11 fruit images, so its poisons "
              "repeat them); it shares its target class with the development goal.", "",
                f"Backdoors: `--rate 0.001` asks for fewer than {BACKDOOR_MIN_COUNT} pairs on oca "
                f"(0.1% of 1,397 = 1), so a rate below {BACKDOOR_MIN_COUNT} pairs runs `--count {BACKDOOR_MIN_COUNT}` "
                "instead; the table shows the rate asked and the real one."] if "oca" in P.datasets else []), "",
              "Targets (issue 13): T1 combined AUROC ≥ 0.95 (default scan); T2 recall ≥ 0.9 at the `auto` cut with "
              "≤ 5% of clean pairs removed; T3 Hit@10 after sanitize + retrain ≤ the clean model's + 0.05; T4 utility "
              "(R@10 t2i and i2t) after sanitize + retrain ≥ the clean model's − 0.02; shipped attacks AUROC ≥ 0.98; "
              "backdoor density AUROC ≥ 0.95.", ""]
        return L

    def sec_utility(self) -> list[str]:
        L = ["## Reference encoders and clean models (test split)", "",
             "| dataset | model | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | class P@10 t2i | class P@10 i2t | chance R@10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
        for ds in self.p.datasets:
            for label, path in (("REF", self.w / ds / "ref_metrics.json"), ("clean-trained", self.w / ds / "clean_metrics.json")):
                u = (load(path) or {}).get("utility")
                if not u:
                    L.append(f"| {ds} | {label} | not run yet |||||||||")
                    continue
                L.append(f"| {ds} | {label} | {f3(u.get('t2i_r@1'))} | {f3(u.get('t2i_r@5'))} | {f3(u.get('t2i_r@10'))} | "
                         f"{f3(u.get('i2t_r@1'))} | {f3(u.get('i2t_r@5'))} | {f3(u.get('i2t_r@10'))} | "
                         f"{f3(u.get('t2i_class_p@10'))} | {f3(u.get('i2t_class_p@10'))} | {f3(u.get('chance_r@10'))} |")
        return L + ["", "fm captions are templates, so instance R@10 on fm is capped by ties; class P@10 is the fm utility "
                        "that means something.", ""]

    def dirty_row(self, s) -> tuple[str, dict]:
        man = s.dir / "poison" / "manifest.parquet"
        pj = load(s.dir / "poison" / "poison.json") or {}
        npois = (pj.get("counts") or {}).get("poisoned")
        pm, cm, sm = load(s.dir / "metrics.json"), load(s.dir / "clean_metrics.json"), load(s.dir / "sanitized_metrics.json")
        sc = scan_numbers(s.dir / "scan", man)
        hp, hc, hs = hit10(pm), hit10(cm), hit10(sm)
        ut = {d: (util(cm, d), util(sm, d)) for d in ("t2i", "i2t")}
        t1 = None if sc.get("auroc") is None else sc["auroc"] >= TARGET_AUROC
        t2 = None if sc.get("recall") is None or sc.get("clean_removed") is None else \
            (sc["recall"] >= TARGET_RECALL and sc["clean_removed"] <= TARGET_CLEAN_REMOVED)
        t3 = None if hs is None or hc is None else hs <= hc + TARGET_HIT + 1e-9
        t4 = None if any(v is None for pair in ut.values() for v in pair) else \
            all(c - z <= TARGET_UTIL + 1e-9 for c, z in ut.values())
        row = (f"| {s.ds} | {s.attack} `{s.goals[0]}` | {IMAGES.get(s.images, s.images)} | {pct(s.rate)} | "
               f"{npois if npois is not None else NA} | {f3(hp)} | {f3(sc.get('auroc'))} | {f3(sc.get('recall'))} | "
               f"{pct(sc.get('clean_removed'))} | {f3(sc.get('recall_at_5pct'))} | {f3(hs)} | {f3(hc)} | "
               f"{f3(ut['t2i'][0])} / {f3(ut['t2i'][1])} | {f3(ut['i2t'][0])} / {f3(ut['i2t'][1])} | "
               f"{mark(t1)} | {mark(t2)} | {mark(t3)} | {mark(t4)} |")
        return row, {"hp": hp, "hc": hc, "hs": hs, "t": (t1, t2, t3, t4)}

    def sec_dirty(self) -> list[str]:
        sets = [s for s in self.p.sets if s.family == "dirty"]
        L = ["## Dirty-label attacks with the attacker's own images", "",
             "`poison --attack single-label|single-image --images-from WORK/data/D/pool [--perturb reencode|crop] "
             "--mode inject --rate R`; default `scan --model REF --threshold auto`; `sanitize`; retrain from REF; "
             "evaluate with the same manifest. Hit@10 = text→image Hit@10 of the class-A test captions (Attack II: "
             "any class-B test image; Attack I: the target image). 'recall @5% clean' = recall at the combined-score "
             "cut that removes 5% of the clean pairs (from scores.parquet + manifest). Utility = R@10 of the clean "
             "model / of the sanitized-retrained model.", "",
             "| dataset | attack | images | rate | #poisoned | Hit@10 poisoned | AUROC | recall (auto) | clean removed (auto) "
             "| recall @5% clean | Hit@10 sanitized | Hit@10 clean | R@10 t2i clean / san. | R@10 i2t clean / san. | T1 | T2 | T3 | T4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        met = {s.name: 0 for s in sets}
        tally = [[0, 0] for _ in range(4)]
        for s in sets:
            row, info = self.dirty_row(s)
            L.append(row)
            for i, t in enumerate(info["t"]):
                if t is not None:
                    tally[i][0] += bool(t)
                    tally[i][1] += 1
            met[s.name] = info
        if sets:
            L += ["", "Targets met: " + ", ".join(f"T{i + 1} {a}/{b}" for i, (a, b) in enumerate(tally)) + " sets."]
        return L + [""]

    def detector_table(self) -> tuple[list[str], dict]:
        sets = [s for s in self.p.sets if s.family in ("dirty", "shipped")]
        per = {}
        names: list[str] = []
        for s in sets:
            d = scan_numbers(s.dir / "scan_all", s.dir / "poison" / "manifest.parquet")
            dd = scan_numbers(s.dir / "scan", s.dir / "poison" / "manifest.parquet")
            if d or dd:
                per[s] = (d.get("detectors", {}), dd.get("auroc"), d.get("auroc"))
                names += [n for n in d.get("detectors", {}) if n not in names]
        L = ["## AUROC per detector", "",
             "Second scan of the same embeddings with every detector `mmsanitize scan --help` lists "
             "(`--embeddings SCAN/embeddings --detectors ALL`); 'default' = the combined score of the default scan, "
             "'all combined' = the combined score of all detectors.", ""]
        if not per:
            return L + ["not run yet", ""], per
        L += ["| dataset | set | " + " | ".join(names) + " | default | all combined |", "|---|---|" + "---|" * (len(names) + 2)]
        for s, (d, dflt, allc) in per.items():
            L.append(f"| {s.ds} | {self.label(s)} | " + " | ".join(f3(d.get(n)) for n in names) + f" | {f3(dflt)} | {f3(allc)} |")
        return L + [""], per

    def label(self, s) -> str:
        return f"{s.attack} {'+'.join(s.goals)} {IMAGES.get(s.images, s.images)} {pct(s.rate)}"

    def sec_shipped(self) -> list[str]:
        sets = [s for s in self.p.sets if s.family == "shipped"]
        L = ["## Shipped attacks (same-dataset images) stay caught", "",
             f"`poison --attack single-image|single-label|multi-label --mode inject --rate {sets[0].rate if sets else ''}` "
             "(no `--images-from`), default scan only. Target AUROC ≥ 0.98.", ""]
        if not sets:
            return L + ["not part of this run", ""]
        L += ["| dataset | attack | goals | #poisoned | AUROC | recall (auto) | clean removed (auto) | recall @5% clean | ≥ 0.98 |",
              "|---|---|---|---|---|---|---|---|---|"]
        for s in sets:
            pj = load(s.dir / "poison" / "poison.json") or {}
            sc = scan_numbers(s.dir / "scan", s.dir / "poison" / "manifest.parquet")
            a = sc.get("auroc")
            L.append(f"| {s.ds} | {s.attack} | {' + '.join(s.goals)} | {(pj.get('counts') or {}).get('poisoned', NA)} | "
                     f"{f3(a)} | {f3(sc.get('recall'))} | {pct(sc.get('clean_removed'))} | {f3(sc.get('recall_at_5pct'))} | "
                     f"{mark(None if a is None else a >= TARGET_SHIPPED)} |")
        return L + [""]

    def sec_backdoor(self) -> list[str]:
        sets = [s for s in self.p.sets if s.family == "backdoor"]
        L = ["## Backdoors", "",
             "`poison --attack patch|blended --target T --mode inject`, trained like the others; `evaluate --manifest` "
             "stamps the same trigger on every test image not of class T: ASR = fraction whose top-10 retrieved test "
             "captions include a class-T caption (i2t@10), and fraction zero-shot-classified as T. Cells: triggered "
             "(untriggered). Suspect-model scan = `scan --model POISONED_MODEL --detectors kdistance,density "
             "--flag-fraction 0.01`: kdistance is Huang et al.'s k-distance (image among all images and captions), "
             "density the joint-vector LOF; target: the better one's AUROC ≥ 0.95. 'REF scan' = the default scan "
             "(`--model REF --threshold auto`): a patch/blended backdoor pairs a class-T caption with an image of "
             "another class, so class_consistency sees it too.", "",
             "| dataset | attack → target | rate asked | #poisoned (rate) | poisoned: ASR i2t@10 | poisoned: zero-shot | "
             "clean: ASR i2t@10 | clean: zero-shot | kdistance AUROC | density AUROC | recall @1% flagged | ≥ 0.95 | "
             "REF scan AUROC | REF scan recall (auto) | REF scan clean removed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in sets:
            pj = load(s.dir / "poison" / "poison.json") or {}
            n, r = (pj.get("counts") or {}).get("poisoned"), pj.get("rate")

            def asr(m):
                b = next(iter(((m or {}).get("backdoor") or {}).values()), None)
                if not b:
                    return NA, NA
                t, u = b.get("triggered") or {}, b.get("untriggered") or {}
                return (f"{f3(t.get('i2t_asr@10'))} ({f3(u.get('i2t_asr@10'))})",
                        f"{f3(t.get('zeroshot_asr'))} ({f3(u.get('zeroshot_asr'))})")
            pa, ca = asr(load(s.dir / "metrics.json")), asr(load(s.dir / "clean_metrics.json"))
            d = load(s.dir / "density_scan" / "summary.json") or {}
            det = d.get("detection") or {}
            ak = (det.get("kdistance") or {}).get("auroc")
            ad = (det.get("density") or {}).get("auroc")
            best = max([x for x in (ak, ad) if x is not None], default=None)
            rec = (det.get("combined") or {}).get("recall")
            L.append(f"| {s.ds} | {s.attack} → {s.goals[0].split('2', 1)[1]} | {pct(s.rate)} | "
                     f"{n if n is not None else NA} ({pct(r)}) | {pa[0]} | {pa[1]} | {ca[0]} | {ca[1]} | {f3(ak)} | "
                     f"{f3(ad)} | {f3(rec)} | {mark(None if best is None else best >= TARGET_DENSITY)} | "
                     f"{self.ref_scan_cells(s)} |")
        b = next((load(s.dir / "metrics.json") for s in sets if load(s.dir / "metrics.json")), None)
        bd = next(iter(((b or {}).get("backdoor") or {}).values()), None)
        if bd:
            L += ["", f"Chance zero-shot = {f3(bd.get('chance_zeroshot'))}; ASR measured on {bd.get('images')} triggered test images."]
        return L + [""]

    def ref_scan_cells(self, s) -> str:
        """AUROC | recall | clean removed of the default REF scan of a backdoor set."""
        d = load(s.dir / "ref_scan" / "summary.json") or {}
        c = (d.get("detection") or {}).get("combined") or {}
        if not c:
            return f"{NA} | {NA} | {NA}"
        pois, flagged, n = (d.get("detection") or {}).get("poisoned"), c.get("flagged"), d.get("samples")
        tp = None if c.get("recall") is None or pois is None else round(c["recall"] * pois)
        removed = None if None in (tp, flagged, n, pois) or n == pois else (flagged - tp) / (n - pois)
        return f"{f3(c.get('auroc'))} | {f3(c.get('recall'))} | {pct(removed)}"

    # ----------------------------------------------------------------- plots
    def plots(self, per) -> list[str]:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        L = []
        self.img.mkdir(parents=True, exist_ok=True)
        if per:
            names = sorted({n for d, _, _ in per.values() for n in d})
            sets = list(per)
            cols = names + ["default"]
            grid = np.array([[np.nan if (v := (per[st][1] if n == "default" else per[st][0].get(n))) is None else v
                              for n in cols] for st in sets], dtype=float)
            fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3.5, 0.32 * len(sets) + 1.6))
            im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
            for (r, c), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            fontweight="bold" if v >= TARGET_AUROC else "normal")
            ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(sets)), [f"{st.ds} {st.attack} {st.images} {st.rate:g}" for st in sets], fontsize=7)
            ax.set_title(f"AUROC per detector (bold: ≥ {TARGET_AUROC}); 'default' = the default scan's combined score",
                         fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.03)
            fig.tight_layout()
            fig.savefig(self.img / "detection_auroc.png", dpi=120)
            plt.close(fig)
            L += ["![AUROC per detector and set](img/detection_auroc.png)", ""]
        dirty = [s for s in self.p.sets if s.family == "dirty"]
        vals = [(s, hit10(load(s.dir / "metrics.json")), hit10(load(s.dir / "sanitized_metrics.json")),
                 hit10(load(s.dir / "clean_metrics.json"))) for s in dirty]
        vals = [v for v in vals if v[1] is not None]
        if vals:
            fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(vals)), 4))
            x = np.arange(len(vals))
            for i, (lab, col) in enumerate((("poisoned", "tab:red"), ("sanitized + retrained", "tab:blue"), ("clean", "tab:green"))):
                ax.bar(x + (i - 1) * 0.27, [np.nan if v[i + 1] is None else v[i + 1] for v in vals], 0.27, label=lab, color=col)
            ax.set_xticks(x, [f"{s.ds} {s.attack} {s.images[:6]} {s.rate:g}" for s, *_ in vals], rotation=45, ha="right", fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("attack Hit@10 (t2i)")
            ax.set_title("Attack success: poisoned vs sanitized + retrained vs clean model")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(self.img / "detection_hit10.png", dpi=120)
            plt.close(fig)
            L += ["![Hit@10 poisoned / sanitized / clean](img/detection_hit10.png)", ""]
        return L

    def sec_commands(self) -> list[str]:
        tot = sum(r["seconds"] for r in self.times.values())
        L = ["## Commands and wall times", "",
             f"Every command as issued (`python -m mmsanitize ...` under `nice -n 10`, two steps at a time on a 2-core "
             f"machine; WORK = the `--work` folder). Sum of step wall times: {tot / 60:.0f} min. "
             "Logs: `WORK/logs/`, records: `WORK/steps.jsonl`.", "", "<details><summary>all steps</summary>", "", "```"]
        for sid, st in self.p.steps.items():
            rec = self.times.get(sid)
            if rec:
                L.append(f"{self.rel(rec['cmd'])}   # {rec['seconds']:.0f} s")
                continue
            try:
                args = st.resolved()
                cmd = "mmsanitize " + " ".join(map(str, args))
            except Exception:  # noqa: BLE001 - needs a file that does not exist yet
                cmd = f"({sid}: resolved when it runs)"
            L.append(f"{self.rel(cmd)}   # " + ("done (not recorded)" if st.marker.exists() else "not run yet"))
        return L + ["```", "", "</details>", ""]

    def write(self) -> None:
        L = self.header() + self.sec_utility() + self.sec_dirty()
        det, per = self.detector_table()
        L += det + self.sec_shipped() + self.sec_backdoor()
        L += ["## Plots", ""] + self.plots(per) + self.sec_commands()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text("\n".join(L) + "\n")
        tmp.replace(self.out)


def render(plan, times: dict, out: Path, img: Path) -> None:
    Report(plan, times, out, img).write()
