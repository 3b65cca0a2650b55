"""The layer study's result: its tables, findings, figures, provenance and summary, from the scan, the
reverse view, the proxy, the search's mixes and the anchors that :mod:`qkit.studies.layer_sensitivity`
measured."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from qkit.core.store import canonical
from qkit.evaluation import metrics
from qkit.quant import mixed
from qkit.studies import layer_figures, plots
from qkit.studies.contract import Summary

# The lower end of the proxy's ρ CI above which it ranks units well enough to prune a scan of them: the
# bar the findings state, and the one a pruned module scan (``prune``) must clear on the modules drawn at
# random. Over fewer units the bootstrap CI means little: 4 perfectly ranked units resample to ρ = 1.
PRUNE_RHO = 0.7
PRUNE_MIN_UNITS = 8


def ranks_well(check: Mapping[str, Any]) -> bool:
    """Whether a :func:`rank_check` row shows a proxy good enough to prune a scan with."""
    return bool(check["units"] >= PRUNE_MIN_UNITS and check["rho_low"] > PRUNE_RHO)


def proxy_top(per_module: Mapping[str, float], k: int) -> list[str]:
    """The `k` modules with the largest proxy, largest first."""
    return sorted(per_module, key=lambda m: -per_module[m])[:k]


def rank_check(scan: pd.DataFrame, proxy: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Spearman's ρ of the proxy against the measured KLD, per text and unit kind (a layer's proxy and KLD
    are on another scale than a module's), with a bootstrap CI over units."""
    rows = []
    for (text, kind), g in scan.groupby(["text", "kind"], sort=False):
        merged = g.merge(proxy, on="unit")
        rho, lo, hi = metrics.spearman_ci(merged["proxy"], merged["kld_mean"], seed=seed)
        rows.append({"text": text, "kind": kind, "units": len(merged), "spearman_rho": rho, "rho_low": lo,
                     "rho_high": hi})
    return pd.DataFrame(rows, columns=["text", "kind", "units", "spearman_rho", "rho_low", "rho_high"])


@dataclass
class Result:
    config: Any  # the study's Config
    scan: pd.DataFrame  # one row per (text, unit): the unit alone in the format
    reverse: pd.DataFrame  # one row per (text, unit): the KLD that keeping the unit in float saves
    costs: pd.DataFrame  # one row per (format, target, search unit): the search's measured costs
    proxy: pd.DataFrame  # one row per scan unit (and per module): the proxy's KLD estimate
    pruning: pd.DataFrame  # one row per text when the module scan was pruned by the proxy (else empty)
    sizes: pd.DataFrame  # bytes per search unit and format
    mixes: pd.DataFrame  # one row per (target, budget): the chosen mix and its prediction
    mix_rows: pd.DataFrame  # the mixes measured on every text, as methods-study rows
    anchor_rows: pd.DataFrame  # the uniform methods on every text
    meta: dict

    def proxy_check(self) -> pd.DataFrame:
        """Spearman's ρ of the proxy against the measured KLD, per text and unit kind, with a bootstrap CI
        over units."""
        return rank_check(self.scan, self.proxy, self.config.seed)

    def pruning_check(self) -> pd.DataFrame:
        """Per text of a pruned module scan: the decision, and what the modules drawn at random say of those
        left out: how many of the random ones outside the proxy's top have a larger KLD than the top's
        median, and the share of the summed KLD that the modules outside the top hold (their mean KLD
        estimated from the random ones)."""
        rows = []
        per_module = self.proxy[self.proxy["unit"].map(mixed.unit_kind) == "module"].set_index("unit")["proxy"]
        top = set(proxy_top(per_module.to_dict(), self.config.prune))
        for _, r in self.pruning.iterrows():
            g = self.scan[(self.scan["text"] == r["text"]) & (self.scan["kind"] == "module")].set_index("unit")
            outside = g[(g["picked"] == "at random") & ~g.index.isin(top)]["kld_mean"]
            in_top = g[g.index.isin(top)]["kld_mean"]
            rest = (r["modules"] - len(in_top)) * outside.mean() if len(outside) else 0.0
            rows.append({**r.to_dict(), "top_median_kld": in_top.median(), "random_outside_top": len(outside),
                         "random_above_top_median": int((outside > in_top.median()).sum()),
                         "outside_top_kld_share": rest / (rest + in_top.sum())})
        return pd.DataFrame(rows)

    def additivity(self) -> pd.DataFrame:
        """Each mix's predicted KLD (the sum of its units') against its measured KLD on its target text."""
        if self.mix_rows.empty:
            return pd.DataFrame()
        r = self.mix_rows[self.mix_rows["text"] == self.mix_rows["target"]]
        r = r.merge(self.mixes[["mix", "bits"]], on="mix")
        out = r[["mix", "target", "budget", "bits", "predicted_kld", "kld_mean", "kld_mean_low",
                 "kld_mean_high"]].copy()
        out["error_pct"] = 100 * (out["predicted_kld"] - out["kld_mean"]) / out["kld_mean"]
        out["within_ci"] = (out["predicted_kld"] >= out["kld_mean_low"]) & (out["predicted_kld"] <= out["kld_mean_high"])
        return out.reset_index(drop=True)

    def cross(self) -> pd.DataFrame:
        """KLD of each mix on each text: a mix chosen on code, scored on prose, and the reverse."""
        if self.mix_rows.empty:
            return pd.DataFrame()
        return self.mix_rows.pivot_table(index="mix", columns="text", values="kld_mean").round(4)

    def pareto(self) -> pd.DataFrame:
        """Size against KLD, per text: the uniform methods and the mixes."""
        cols = ["method", "text", "bf16_run_mb", "kld_mean", "kld_mean_low", "kld_mean_high", "top1_pct"]
        both = pd.concat([self.anchor_rows.assign(kind="uniform"), self.mix_rows.assign(kind="mix")])
        return both.reindex(columns=["kind", *cols]).reset_index(drop=True)

    def tables(self) -> dict[str, pd.DataFrame]:
        scan = self.scan.drop(columns=["chunk_kld"]).round(5)
        return {"scan": scan, "reverse": self.reverse.round(5), "proxy check": self.proxy_check().round(3),
                "pruning": self.pruning_check().round(5),
                "search costs": self.costs.drop(columns=["chunk_kld"], errors="ignore").round(5), "unit sizes": self.sizes,
                "mixes": self.mixes.drop(columns=["assignment"], errors="ignore").round(4), "additivity": self.additivity().round(4),
                "cross evaluation": self.cross(), "size against KLD": self.pareto().round(4)}

    def findings(self) -> list[str]:
        c, out = self.config, []
        for (text, kind), g in self.scan.groupby(["text", "kind"], sort=False):
            g = g.sort_values("kld_mean", ascending=False)
            top = g.iloc[0]
            rest = g.iloc[1:]
            apart = rest[rest["kld_high"] < top["kld_low"]]
            out.append(f"**{text}**: the most sensitive {kind} in {c.format} is {top['unit']} (KLD "
                       f"{top['kld_mean']:.3g} [{top['kld_low']:.3g}, {top['kld_high']:.3g}]); its CI lies above "
                       f"{len(apart)} of the other {len(rest)} {kind}s' CIs. The least sensitive: "
                       f"{g.iloc[-1]['unit']} ({g.iloc[-1]['kld_mean']:.3g}).")
        for _, r in self.proxy_check().iterrows():
            verdict = ("ranks them well enough to prune a larger scan" if ranks_well(r) else
                       f"is not judged: {PRUNE_MIN_UNITS} units are needed" if r["units"] < PRUNE_MIN_UNITS else
                       "ranks them better than chance, not well enough to replace the measurement" if r["rho_low"] > 0
                       else "does not rank them reliably")
            out.append(f"The proxy (the diagonal Fisher estimate of the KLD) against the measured KLD on "
                       f"{r['text']}, over {r['units']} {r['kind']} units: Spearman ρ {r['spearman_rho']:.2f} "
                       f"[{r['rho_low']:.2f}, {r['rho_high']:.2f}]: it {verdict}.")
        for _, r in self.pruning_check().iterrows():
            ranked = (f"on {r['at_random']} modules drawn at random, the proxy ranked the measured KLDs with ρ "
                      f"{r['random_rho']:.2f} [{r['rho_low']:.2f}, {r['rho_high']:.2f}]")
            if not r["pruned"]:
                out.append(f"**{r['text']}**: every one of the {r['modules']} modules was measured: {ranked}, "
                           f"short of the {PRUNE_RHO} over at least {PRUNE_MIN_UNITS} modules needed to prune.")
                continue
            out.append(f"**{r['text']}**: the module scan was pruned by the proxy: {ranked}, clearing {PRUNE_RHO}, "
                       f"so its top {self.config.prune} were measured too ({r['measured']} of {r['modules']} "
                       f"modules) and the rest left out. Of the random ones outside the top, "
                       f"{r['random_above_top_median']} of {r['random_outside_top']} have a larger KLD than the "
                       f"top's median ({r['top_median_kld']:.3g}), and the modules outside the top hold an estimated "
                       f"{r['outside_top_kld_share']:.0%} of the summed KLD. The heatmap leaves those left out blank.")
        add = self.additivity()
        if len(add):
            inside = int(add["within_ci"].sum())
            out.append(f"Additivity: the summed unit KLDs predicted the mixes' measured KLD within "
                       f"{add['error_pct'].abs().max():.0f}% (worst case); {inside} of {len(add)} predictions lie "
                       "inside the measured 95% CI.")
        out += self._against_uniform()
        return out

    def _against_uniform(self) -> list[str]:
        """Each uniform method against the mix closest to it in size, from the paired CI over chunks."""
        out = []
        if self.mix_rows.empty or self.anchor_rows.empty:
            return out
        mixes = self.mix_rows[self.mix_rows["text"] == self.mix_rows["target"]]
        for _, a in self.anchor_rows.iterrows():
            near = mixes[mixes["text"] == a["text"]]
            if near.empty:
                continue
            m = near.loc[(near["bf16_run_mb"] - a["bf16_run_mb"]).abs().idxmin()]
            diff, lo, hi = metrics.mean_ci(m["chunk_kld"], paired_with=a["chunk_kld"], seed=self.config.seed)
            word = "lower KLD than" if hi < 0 else "higher KLD than" if lo > 0 else "no resolved difference from"
            out.append(f"On {a['text']}, the mix closest in size to {a['method']} ({a['bf16_run_mb']:.3g} MB), "
                       f"{m['mix']} ({m['bf16_run_mb']:.3g} MB), has {word} it: KLD difference {diff:+.3g} "
                       f"[{lo:+.3g}, {hi:+.3g}].")
        return out

    def figures(self) -> plots.Figures:
        texts = list(dict.fromkeys(self.scan["text"]))
        return plots.Figures({
            "layer x module type": lambda: layer_figures.layer_heatmaps(self._module_grid(), self.config.format),
            "sensitivity by layer": lambda: layer_figures.unit_curves(self.scan[self.scan["kind"] == "layer"], texts),
            "sensitivity by module type": lambda: layer_figures.unit_bars(self.scan[self.scan["kind"] == "type"], texts),
            "proxy against measured": lambda: layer_figures.proxy_scatter(self.scan.merge(self.proxy, on="unit")),
            "size against KLD": lambda: layer_figures.pareto(self.pareto()),
        })

    def _module_grid(self) -> dict[str, pd.DataFrame]:
        """Layer x module type grids: measured per module where the scan has modules (blank where a pruned
        scan left one out), else the proxy."""
        modules = self.scan[self.scan["kind"] == "module"]
        every = [u for u in self.proxy["unit"] if mixed.unit_kind(u) == "module"]
        layers = sorted({mixed.layer_of(u) for u in every})
        types = sorted({mixed.module_type(u) for u in every})
        grids = {}
        source = ({t: g.set_index("unit")["kld_mean"] for t, g in modules.groupby("text", sort=False)} if len(modules)
                  else {"proxy (Fisher KLD estimate)": self.proxy.set_index("unit")["proxy"]})
        for label, values in source.items():
            rows = [{"layer": mixed.layer_of(u), "type": mixed.module_type(u), "value": v}
                    for u, v in values.items() if mixed.unit_kind(u) == "module"]
            grids[label] = pd.DataFrame(rows).pivot(index="layer", columns="type", values="value").reindex(
                index=layers, columns=types)
        return grids

    def provenance(self) -> pd.DataFrame:
        p = self.meta["provenance"]
        return pd.DataFrame([{"model": self.meta["model"]["spec"], "fingerprint": self.meta["model"]["fingerprint"],
                              "format": self.config.format, "formats": ", ".join(self.config.formats),
                              "texts": ", ".join(self.config.texts), "eval tokens": self.config.eval_tokens,
                              "calibration (proxy)": f"{self.config.calib} {self.config.samples}x{self.config.seq_len}",
                              "calibration sha256": (self.meta["calibration"] or {}).get("sha256", "-"),
                              "seed": self.config.seed, "git": p.get("git_commit"),
                              "hardware": canonical(p.get("hardware", {})),
                              "libraries": canonical(p.get("libraries", {}))}])

    def summary(self) -> Summary:
        prose = self.scan[self.scan["text"] == self.scan["text"].iloc[0]].sort_values("kld_mean", ascending=False)
        add = self.additivity()
        best = add.sort_values("kld_mean").iloc[0] if len(add) else None
        headline = (f"most sensitive in {self.config.format}: {prose.iloc[0]['unit']} on {prose.iloc[0]['text']}"
                    + (f"; best mix {best['mix']} KLD {best['kld_mean']:.3g} (predicted {best['predicted_kld']:.3g})"
                       if best is not None else ""))
        return Summary("layer sensitivity", headline, best["mix"] if best is not None else None, "ok",
                       "size against KLD")
