//! `report.html`: one self-contained page per run folder (a single stage, or the demo's folder
//! of stages) with SVG plots drawn by `plotters` — loss curves per stage; reward, KL, β,
//! entropy and response length over PPO iterations; gold vs proxy reward against √KL with
//! Gao et al.'s fitted forms — and the demo's comparison table and samples.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::run::{METRICS, REPORT};

/// One line of a plot: a name and its points.
type Series = (String, Vec<(f64, f64)>);

/// Writes `report.html` into `dir` and returns its path.
pub fn write_report(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        anyhow::bail!("{}: not a folder (give a run folder or the demo's folder)", dir.display());
    }
    let mut html = page_head("rlhf report");
    let _ = write!(html, "<h1>rlhf report</h1><p><code>{}</code></p>", escape(&dir.display().to_string()));
    let summary = dir.join("summary.json");
    if summary.is_file() {
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)
            .with_context(|| format!("{}", summary.display()))?;
        demo_section(&mut html, &s)?;
    }
    let mut stages: Vec<PathBuf> = vec![];
    if dir.join(METRICS).is_file() {
        stages.push(dir.to_path_buf());
    }
    // a demo folder: its stages' runs
    for name in crate::demo::STAGES {
        if dir.join(name).join(METRICS).is_file() {
            stages.push(dir.join(name));
        }
    }
    if stages.is_empty() && !summary.is_file() {
        anyhow::bail!(
            "{}: no {METRICS} and no demo summary.json here or in a stage folder ({}); not a run folder",
            dir.display(),
            crate::demo::STAGES.join(", ")
        );
    }
    for stage in &stages {
        stage_section(&mut html, stage)?;
    }
    html.push_str("</body></html>\n");
    let out = dir.join(REPORT);
    std::fs::write(&out, html).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// The page's head (title, style) and the opening body tag.
fn page_head(title: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         .plots{{display:flex;flex-wrap:wrap;gap:8px}}</style></head><body>"
    )
}

fn read_metrics(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let p = dir.join(METRICS);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}: line {}", p.display(), i + 1)))
        .collect()
}

/// `(step, value)` of every record that has `key`.
fn curve(metrics: &[serde_json::Value], key: &str) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(key)?.as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// The plots of a run's metrics — (title, metric keys) — by the kind of run: PPO, the
/// critic-free trainers, or a supervised stage (pretrain, SFT, reward, DPO).
fn plot_specs(m: &[serde_json::Value]) -> Vec<(&'static str, &'static [&'static str])> {
    if m.iter().any(|r| r.get("objective/scores").is_some()) {
        vec![
            ("reward", &["objective/scores", "objective/rlhf_reward", "eval/scores"]),
            ("running score statistics", &["score/running_mean", "score/running_std"]),
            ("reward-model ensemble disagreement", &["reward/ensemble_std"]),
            ("KL to the reference", &["objective/kl", "eval/kl"]),
            ("β", &["objective/beta"]),
            ("entropy", &["policy/entropy_avg"]),
            ("response length", &["val/response_length", "eval/response_length"]),
            ("losses", &["loss/policy_avg", "loss/value_avg"]),
        ]
    } else if m.iter().any(|r| r.get("frac_reward_zero_std").is_some()) {
        // GRPO / RLOO / REINFORCE++
        vec![
            ("reward", &["reward", "reward_std", "eval/reward"]),
            ("running score statistics", &["score/running_mean", "score/running_std"]),
            ("reward-model ensemble disagreement", &["reward/ensemble_std"]),
            ("KL to the reference", &["kl", "kl_seq", "eval/kl"]),
            ("entropy", &["entropy"]),
            ("completion length", &["completions/mean_length", "eval/completions/mean_length"]),
            ("clip ratio", &["clip_ratio/region_mean"]),
            ("groups", &["frac_reward_zero_std", "dynamic_sampling/informative_fraction"]),
            ("rollouts per iteration", &["dynamic_sampling/generation_batches"]),
            ("implicit reward margin", &["rewards/margins"]),
            ("loss", &["loss"]),
        ]
    } else {
        vec![
            ("loss", &["loss", "val_loss", "eval/loss"]),
            ("accuracy", &["accuracy", "eval/accuracy", "rewards/accuracies", "eval/rewards/accuracies"]),
            ("implicit reward margin", &["rewards/margins", "eval/rewards/margins"]),
            ("sampled KL to the reference", &["eval/sample_kl"]),
        ]
    }
}

/// The curves of `keys` in the metrics `m`, each named `prefix` + key; absent keys left out.
fn named_curves(m: &[serde_json::Value], keys: &[&str], prefix: &str) -> Vec<Series> {
    keys.iter().map(|k| (format!("{prefix}{k}"), curve(m, k))).filter(|(_, c)| !c.is_empty()).collect()
}

fn stage_section(html: &mut String, dir: &Path) -> Result<()> {
    let m = read_metrics(dir)?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("run");
    let _ = write!(html, "<h2>{}</h2><div class=\"plots\">", escape(name));
    for (title, keys) in plot_specs(&m) {
        let series = named_curves(&m, keys, "");
        if !series.is_empty() {
            html.push_str(&line_plot(title, "step", &series, &[], &[])?);
        }
    }
    html.push_str("</div>");
    Ok(())
}

/// Writes `out`: one page that overlays the runs' curves, plot by plot (the plots of the first
/// run's kind; each line named `run: metric`, a run by its folder's name), and returns `out`.
pub fn write_comparison(runs: &[PathBuf], out: &Path) -> Result<PathBuf> {
    let metrics: Vec<(String, Vec<serde_json::Value>)> = runs
        .iter()
        .map(|dir| {
            if !dir.join(METRICS).is_file() {
                anyhow::bail!("{}: no {METRICS}; not a run folder", dir.display());
            }
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("run").to_string();
            Ok((name, read_metrics(dir)?))
        })
        .collect::<Result<_>>()?;
    let Some((_, first)) = metrics.first() else { anyhow::bail!("no run folders to compare") };
    let mut html = page_head("rlhf comparison");
    html.push_str("<h1>rlhf comparison</h1><ul>");
    for dir in runs {
        let _ = write!(html, "<li><code>{}</code></li>", escape(&dir.display().to_string()));
    }
    html.push_str("</ul><div class=\"plots\">");
    for (title, keys) in plot_specs(first) {
        let series: Vec<Series> =
            metrics.iter().flat_map(|(name, m)| named_curves(m, keys, &format!("{name}: "))).collect();
        if !series.is_empty() {
            html.push_str(&line_plot(title, "step", &series, &[], &[])?);
        }
    }
    html.push_str("</div></body></html>\n");
    std::fs::write(out, html).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

fn demo_section(html: &mut String, s: &serde_json::Value) -> Result<()> {
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let _ = write!(
        html,
        "<h2>SFT vs PPO vs best-of-n (held-out prompts)</h2><p>Reward model: {:.3} accuracy against the gold \
         ordering on held-out pairs.</p><table><tr><th>policy</th><th>gold reward</th><th>proxy reward</th>\
         <th>KL to SFT</th><th>response length</th></tr>",
        num(&s["rm_gold_accuracy"])
    );
    let policies = s["policies"].as_array().cloned().unwrap_or_default();
    for p in &policies {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.1}</td></tr>",
            escape(p["name"].as_str().unwrap_or("")),
            num(&p["gold"]),
            num(&p["proxy"]),
            num(&p["kl"]),
            num(&p["length"])
        );
    }
    html.push_str("</table><table><tr><th>prompt</th><th>SFT</th><th>PPO</th></tr>");
    for row in s["samples"].as_array().cloned().unwrap_or_default() {
        let cell = |i: usize| escape(row[i].as_str().unwrap_or("").trim());
        let _ = write!(html, "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", cell(0), cell(1), cell(2));
    }
    html.push_str("</table>");
    // over-optimisation: gold and proxy against √KL, PPO along training and best-of-n
    let sqrt_kl = |k: f64| k.max(0.0).sqrt();
    let ppo: Vec<(f64, f64, f64)> = s["ppo_curve"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| (num(&t[0]), num(&t[1]), num(&t[2])))
        .collect();
    let bon: Vec<&serde_json::Value> =
        policies.iter().filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("best-of"))).collect();
    let gold_bon: Vec<(f64, f64)> = bon.iter().map(|p| (sqrt_kl(num(&p["kl"])), num(&p["gold"]))).collect();
    let proxy_bon: Vec<(f64, f64)> = bon.iter().map(|p| (sqrt_kl(num(&p["kl"])), num(&p["proxy"]))).collect();
    let gold_rl: Vec<(f64, f64)> = ppo.iter().map(|&(g, _, k)| (sqrt_kl(k), g)).collect();
    let proxy_rl: Vec<(f64, f64)> = ppo.iter().map(|&(_, p, k)| (sqrt_kl(k), p)).collect();
    let mut fits = vec![];
    if let Some((a, b)) = fit(&gold_bon, |d| d) {
        let base = gold_bon[0].1;
        let dmax = gold_bon.last().map_or(1.0, |p| p.0);
        fits.push((
            format!("gold fit, best-of-n: d(α − βd), α={a:.2} β={b:.2}"),
            sample_fn(dmax, |d| base + d * (a - b * d)),
        ));
    }
    if let Some((a, b)) = fit(&gold_rl, |d| d.ln()) {
        let base = gold_rl.first().map_or(0.0, |p| p.1);
        let dmax = gold_rl.iter().map(|p| p.0).fold(0.0, f64::max);
        fits.push((
            format!("gold fit, PPO: d(α − β log d), α={a:.2} β={b:.2}"),
            sample_fn(dmax, |d| base + d * (a - b * d.ln())),
        ));
    }
    html.push_str("<h2>Over-optimisation (Gao et al. 2022)</h2><div class=\"plots\">");
    let lines = vec![("gold, best-of-n".to_string(), gold_bon), ("proxy, best-of-n".to_string(), proxy_bon)];
    let points = vec![("gold, PPO iterations".to_string(), gold_rl), ("proxy, PPO iterations".to_string(), proxy_rl)];
    html.push_str(&line_plot("reward vs √KL", "√KL", &lines, &points, &fits)?);
    html.push_str("</div>");
    Ok(())
}

/// Least squares of `(R − R₀)/d = α − β·g(d)` over points with `d > 0` (R₀ the first point's
/// reward), i.e. Gao et al.'s `R(d) = d(α − β g(d))`.
fn fit(points: &[(f64, f64)], g: impl Fn(f64) -> f64) -> Option<(f64, f64)> {
    let base = points.first()?.1;
    let xs: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.0 > 1e-3)
        .map(|&(d, r)| (g(d), (r - base) / d))
        .filter(|p| p.0.is_finite())
        .collect();
    if xs.len() < 3 {
        return None;
    }
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().map(|p| p.0).sum::<f64>() / n, xs.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx < 1e-12 {
        return None;
    }
    let slope = xs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx;
    Some((my - slope * mx, -slope))
}

fn sample_fn(dmax: f64, f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
    (1..=40).map(|i| dmax * i as f64 / 40.0).map(|d| (d, f(d))).collect()
}

/// An inline SVG plot: `series` as lines with points, `scatter` as points, `dashed` as dashed
/// lines.
fn line_plot(title: &str, x_label: &str, series: &[Series], scatter: &[Series], dashed: &[Series]) -> Result<String> {
    let all: Vec<(f64, f64)> = series.iter().chain(scatter).chain(dashed).flat_map(|s| s.1.iter().copied()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in &all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !(x0.is_finite() && y0.is_finite()) {
        return Ok(String::new());
    }
    let pad = |a: f64, b: f64| {
        if (b - a).abs() < 1e-9 {
            (a - 1.0, b + 1.0)
        } else {
            (a - 0.05 * (b - a), b + 0.05 * (b - a))
        }
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc(x_label).draw().map_err(plot_err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled()))).map_err(plot_err)?;
        }
        for (i, (name, pts)) in scatter.iter().enumerate() {
            let color = Palette99::pick(i + series.len()).to_rgba();
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 3, color.filled()));
        }
        for (i, (name, pts)) in dashed.iter().enumerate() {
            let color = Palette99::pick(i + series.len() + scatter.len()).to_rgba();
            chart
                .draw_series(DashedLineSeries::new(pts.iter().copied(), 6, 4, color.stroke_width(1)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(1)));
        }
        if series.len() + scatter.len() + dashed.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 10))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e:?}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
