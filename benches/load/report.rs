//! The report of a load run: the table (req/s, p50, p99, errors, the server's CPU per
//! request on hits, ratios to nginx, to
//! Varnish, and to each baseline that ran: "vs baseline" for the one on the memory
//! store, "vs redis baseline" for the one on Redis) on stdout and as Markdown, the lines
//! under it (miss overhead, coalescing, Echo memory and Echo redis each against the
//! baseline on its store, RSS), and the SVG chart; written to `target/bench/load.md` and
//! `load.svg`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::peers::{Kind, KINDS};
use crate::wrk::WrkResult;
use crate::{Res, SCENARIOS};

/// A scenario (index into `SCENARIOS`) through one peer: the run of median req/s among
/// its rounds, and every round's req/s (None: that run failed).
pub(crate) struct Row {
    pub(crate) scenario: usize,
    pub(crate) kind: Kind,
    pub(crate) result: Res<WrkResult>,
    pub(crate) rounds: Vec<Option<f64>>,
}

impl Row {
    /// The row of `runs` (one per round, in order): the successful run of median req/s
    /// (the lower middle one of an even count) with the errors of every run added up,
    /// or the first failure when none succeeded.
    pub(crate) fn of_rounds(scenario: usize, kind: Kind, runs: Vec<Res<WrkResult>>) -> Row {
        let rounds = runs
            .iter()
            .map(|r| r.as_ref().ok().map(|w| w.rps))
            .collect();
        let errors: u64 = runs.iter().flatten().map(|w| w.errors).sum();
        let mut ok: Vec<WrkResult> = Vec::new();
        let mut first_err = None;
        for run in runs {
            match run {
                Ok(w) => ok.push(w),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        ok.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let middle = ok.len().saturating_sub(1) / 2;
        let result = match ok.into_iter().nth(middle) {
            Some(w) => Ok(WrkResult { errors, ..w }),
            None => Err(first_err.unwrap_or_else(|| "no run".into())),
        };
        Row {
            scenario,
            kind,
            result,
            rounds,
        }
    }
}

/// For every scenario run in more than one round: each Echo's req/s against nginx's run
/// of the same round (they ran back to back), round by round, with the median. The
/// ratio of one round is less exposed to the machine's drift than medians of separate
/// runs.
pub(crate) fn round_lines(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate() {
        let Some(nginx) = rows
            .iter()
            .find(|r| r.scenario == i && r.kind == Kind::Nginx && r.rounds.len() > 1)
        else {
            continue;
        };
        for row in rows.iter().filter(|r| r.scenario == i && r.kind.is_echo()) {
            let mut ratios: Vec<f64> = row
                .rounds
                .iter()
                .zip(&nginx.rounds)
                .filter_map(|(e, n)| Some(e.as_ref()? / n.as_ref()?))
                .collect();
            if ratios.is_empty() {
                continue;
            }
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
            ratios.sort_by(f64::total_cmp);
            out.push(format!(
                "{}, {}: {} (median {:.2}x, lowest {:.2}x)",
                s.name,
                row.kind.name(),
                each.join(" "),
                ratios[(ratios.len() - 1) / 2],
                ratios[0],
            ));
        }
    }
    out
}

pub(crate) fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// A latency axis label: `100 µs`, `1 ms`, `0.5 s`.
fn fmt_axis_us(us: f64) -> String {
    let short = |v: f64| (v * 100.0).round() / 100.0;
    if us < 1000.0 {
        format!("{} µs", short(us))
    } else if us < 1e6 {
        format!("{} ms", short(us / 1e3))
    } else {
        format!("{} s", short(us / 1e6))
    }
}

pub(crate) fn fmt_rps(rps: f64) -> String {
    if rps >= 100.0 {
        format!("{rps:.0}")
    } else {
        format!("{rps:.1}")
    }
}

fn result_of(rows: &[Row], scenario: usize, kind: Kind) -> Option<&WrkResult> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.kind == kind)
        .and_then(|r| r.result.as_ref().ok())
}

fn rps_of(rows: &[Row], scenario: usize, kind: Kind) -> Option<f64> {
    result_of(rows, scenario, kind).map(|w| w.rps)
}

fn p50_of(rows: &[Row], scenario: usize, kind: Kind) -> Option<f64> {
    result_of(rows, scenario, kind).map(|w| w.p50_us)
}

/// Whether `kind` ran: a baseline's column and its comparison are shown only then.
fn ran(rows: &[Row], kind: Kind) -> bool {
    rows.iter().any(|r| r.kind == kind)
}

/// The baselines that ran, each with its column title, in column order.
fn baseline_columns(rows: &[Row]) -> Vec<(Kind, &'static str)> {
    [
        (Kind::EchoBaseline, "vs baseline"),
        (Kind::EchoRedisBaseline, "vs redis baseline"),
    ]
    .into_iter()
    .filter(|(k, _)| ran(rows, *k))
    .collect()
}

/// The table's column titles; a baseline's column only when that baseline ran.
fn header(rows: &[Row]) -> Vec<&'static str> {
    let mut h = vec![
        "scenario",
        "proxy",
        "req/s",
        "p50",
        "p99",
        "errors",
        "CPU µs/req",
        "vs nginx",
        "vs Varnish",
    ];
    h.extend(baseline_columns(rows).into_iter().map(|(_, title)| title));
    h
}

/// The table's cells, one Vec per row, in table order, as many as `header`.
fn table_cells(rows: &[Row]) -> Vec<Vec<String>> {
    let ratio =
        |rps: f64, base: Option<f64>| base.map_or("-".to_string(), |b| format!("{:.2}x", rps / b));
    let baselines = baseline_columns(rows);
    let mut out = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate() {
        for kind in KINDS {
            let Some(row) = rows.iter().find(|r| r.scenario == i && r.kind == kind) else {
                continue;
            };
            let mut bases = vec![rps_of(rows, i, Kind::Nginx), rps_of(rows, i, Kind::Varnish)];
            bases.extend(baselines.iter().map(|(k, _)| rps_of(rows, i, *k)));
            let mut cells = vec![s.name.to_string(), kind.name().to_string()];
            match &row.result {
                Ok(w) => {
                    cells.extend([
                        fmt_rps(w.rps),
                        fmt_us(w.p50_us),
                        fmt_us(w.p99_us),
                        w.errors.to_string(),
                        w.cpu_us_per_req
                            .map_or("-".to_string(), |c| format!("{c:.1}")),
                    ]);
                    cells.extend(bases.into_iter().map(|b| ratio(w.rps, b)));
                }
                Err(_) => {
                    cells.push("failed".into());
                    cells.extend((0..4 + bases.len()).map(|_| "-".to_string()));
                }
            }
            out.push(cells);
        }
    }
    out
}

/// `current` (Echo memory or Echo redis) against the baseline on its store
/// (`Kind::baseline`), one line per scenario run (no ratio when either run failed):
/// current / baseline of req/s (above 1: the current build serves more) and of p99 (below
/// 1: the current build's tail is shorter). Empty when that baseline did not run.
pub(crate) fn baseline_lines(rows: &[Row], current: Kind) -> Vec<String> {
    let mut out = Vec::new();
    let Some(baseline) = current.baseline().filter(|b| ran(rows, *b)) else {
        return out;
    };
    for (i, s) in SCENARIOS.iter().enumerate() {
        let mem = result_of(rows, i, current);
        let base = result_of(rows, i, baseline);
        match (mem, base) {
            (Some(m), Some(b)) => out.push(format!(
                "{}: req/s {:.2}x ({} vs {}), p99 {:.2}x ({} vs {})",
                s.name,
                m.rps / b.rps,
                fmt_rps(m.rps),
                fmt_rps(b.rps),
                m.p99_us / b.p99_us,
                fmt_us(m.p99_us),
                fmt_us(b.p99_us),
            )),
            (None, None) => {}
            _ => out.push(format!("{}: no ratio (a run failed)", s.name)),
        }
    }
    out
}

fn print_table(rows: &[Row]) {
    let cells = table_cells(rows);
    // scenario, proxy, req/s, p50, p99, errors, CPU µs/req, vs nginx, vs Varnish, vs
    // baseline, vs redis baseline.
    const WIDTHS: [usize; 11] = [26, 21, 9, 10, 10, 7, 10, 9, 10, 11, 17];
    let line = |c: &[String]| {
        let mut text = String::new();
        for (j, (cell, width)) in c.iter().zip(WIDTHS).enumerate() {
            let sep = if j == 0 { "" } else { " " };
            if j < 2 {
                let _ = write!(text, "{sep}{cell:<width$}");
            } else {
                let _ = write!(text, "{sep}{cell:>width$}");
            }
        }
        println!("{}", text.trim_end());
    };
    line(
        &header(rows)
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    );
    let mut last = String::new();
    for c in cells {
        if c[0] != last && !last.is_empty() {
            println!();
        }
        last.clone_from(&c[0]);
        line(&c);
    }
}

fn markdown_table(rows: &[Row]) -> String {
    let header = header(rows);
    let mut md = format!("| {} |\n|---|---|", header.join(" | "));
    md.push_str(&"---:|".repeat(header.len() - 2));
    md.push('\n');
    for c in table_cells(rows) {
        let _ = writeln!(md, "| {} |", c.join(" | "));
    }
    md
}

/// Miss overhead, one line per miss scenario the origin ran in: p50 through each proxy
/// minus p50 of the same misses straight to the origin.
pub(crate) fn miss_overhead(rows: &[Row]) -> Vec<String> {
    let mut overhead = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate().filter(|(_, s)| s.with_origin) {
        let Some(base) = p50_of(rows, i, Kind::Origin) else {
            continue;
        };
        let parts: Vec<String> = KINDS
            .into_iter()
            .filter(|k| *k != Kind::Origin)
            .filter_map(|k| {
                p50_of(rows, i, k).map(|p| {
                    let d = p - base;
                    let sign = if d < 0.0 { "-" } else { "+" };
                    format!("{} {sign}{}", k.name(), fmt_us(d.abs()))
                })
            })
            .collect();
        overhead.push(format!(
            "{} (origin p50 {}): {}",
            s.name,
            fmt_us(base),
            parts.join(", ")
        ));
    }
    overhead
}

/// A titled list of lines under the table: printed and written only when it has some (a
/// run of the hit scenarios alone has no miss overhead).
pub(crate) type Section<'a> = (String, &'a [String]);

/// What a run found, as the terminal and the files show it.
pub(crate) struct Report<'a> {
    pub(crate) rows: &'a [Row],
    pub(crate) sections: &'a [Section<'a>],
    pub(crate) notes: &'a [String],
}

impl Report<'_> {
    /// The table, each section with lines, then the notes, on stdout.
    pub(crate) fn print(&self) {
        println!("\n");
        print_table(self.rows);
        println!();
        for (title, lines) in self.sections.iter().filter(|(_, l)| !l.is_empty()) {
            println!("{title}");
            for l in *lines {
                println!("  {l}");
            }
        }
        for n in self.notes {
            println!("note: {n}");
        }
    }

    /// The same as files, for the README: `load.md` and `load.svg` in `out_dir`, for a
    /// run of `seconds` per wrk run with these `versions`. Returns their paths.
    pub(crate) fn write_files(
        &self,
        out_dir: &Path,
        seconds: u64,
        versions: &[String],
        baseline: bool,
    ) -> Res<(PathBuf, PathBuf)> {
        fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let with_baseline = if baseline {
            ", with a baseline Echo"
        } else {
            ""
        };
        let mut md = format!("# Load comparison: Echo, nginx and Varnish{with_baseline}\n\n");
        let _ = writeln!(
            md,
            "{}. {cores} cores; one demo origin behind every proxy; wrk with 1 thread for {seconds} s \
             per run, all on 127.0.0.1 (wrk takes about one core, the proxy shares the rest with the \
             origin and Redis). Versions: {}.\n",
            httpdate::fmt_http_date(SystemTime::now()),
            versions.join("; ")
        );
        md.push_str(&markdown_table(self.rows));
        for (title, lines) in self.sections.iter().filter(|(_, l)| !l.is_empty()) {
            let _ = writeln!(md, "\n{title}\n");
            for l in *lines {
                let _ = writeln!(md, "- {l}");
            }
        }
        if !self.notes.is_empty() {
            md.push_str("\nNotes:\n\n");
            for n in self.notes {
                let _ = writeln!(md, "- {}", n.replace('\n', " "));
            }
        }
        let md_path = out_dir.join("load.md");
        fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
        let svg_path = out_dir.join("load.svg");
        let title = format!(
            "Echo vs nginx vs Varnish{with_baseline}, wrk -t1, {seconds} s per run, {cores} cores"
        );
        draw_chart(self.rows, &title, &svg_path)
            .map_err(|e| format!("{}: {e}", svg_path.display()))?;
        Ok((md_path, svg_path))
    }
}

// -----------------------------------------------------------------------------------------
// The SVG chart: one panel per measure, scenarios along x, one bar per proxy. With a
// baseline, the req/s and p99 panels carry, above each scenario, Echo memory's ratio to
// the baseline on memory ("mem") and Echo redis's to the one on Redis ("redis").

fn nice_log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    (
        10f64.powf(lo.log10().floor()),
        10f64.powf((hi.log10() + 0.05).ceil()),
    )
}

fn draw_chart(rows: &[Row], title: &str, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    // Title, value, axis labels, and whether the ratios to the baselines are written above.
    type Measure = (&'static str, fn(&WrkResult) -> f64, fn(f64) -> String, bool);
    let measures: [Measure; 3] = [
        (
            "requests per second (log scale; higher is better)",
            |w| w.rps,
            |v| {
                if v >= 1e6 {
                    format!("{:.0}M", v / 1e6)
                } else if v >= 1e3 {
                    format!("{:.0}k", v / 1e3)
                } else {
                    format!("{v:.0}")
                }
            },
            true,
        ),
        (
            "p50 latency (log scale; lower is better)",
            |w| w.p50_us,
            fmt_axis_us,
            false,
        ),
        (
            "p99 latency (log scale; lower is better)",
            |w| w.p99_us,
            fmt_axis_us,
            true,
        ),
    ];
    let ok: Vec<(usize, Kind, &WrkResult)> = rows
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|w| (r.scenario, r.kind, w)))
        .collect();
    // One slot per scenario that ran (ECHO_BENCH_SCENARIOS may leave some out).
    let slots: Vec<usize> = (0..SCENARIOS.len())
        .filter(|i| ok.iter().any(|(s, _, _)| s == i))
        .collect();
    let slot_of = |s: usize| slots.iter().position(|&i| i == s).unwrap_or(0) as f64;
    let n = slots.len().max(1);
    // The ratios written above each scenario: a label, and Echo against its baseline.
    let pairs: Vec<(&str, Kind, Kind)> = [("mem", Kind::EchoMemory), ("redis", Kind::EchoRedis)]
        .into_iter()
        .filter_map(|(label, current)| Some((label, current, current.baseline()?)))
        .filter(|(_, _, b)| ok.iter().any(|(_, k, _)| k == b))
        .collect();
    let root = SVGBackend::new(path, (1280, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    // The legend in a column of its own on the right, clear of the bars.
    let (plots, legend) = root.split_horizontally(1100);
    for (i, kind) in KINDS
        .into_iter()
        .filter(|k| ok.iter().any(|(_, k2, _)| k2 == k))
        .enumerate()
    {
        let (r, g, b) = kind.color();
        let y = 50 + 22 * i as i32;
        legend.draw(&Rectangle::new(
            [(4, y), (18, y + 12)],
            RGBColor(r, g, b).filled(),
        ))?;
        legend.draw(&Text::new(kind.name(), (24, y), ("sans-serif", 13)))?;
    }
    if !pairs.is_empty() {
        let mut lines = vec![
            "above req/s and p99,".to_string(),
            "current / baseline:".to_string(),
        ];
        for (label, current, baseline) in &pairs {
            lines.push(format!("{label}: {} /", current.name()));
            lines.push(format!("   {}", baseline.name()));
        }
        let y = 60 + 22 * KINDS.len() as i32;
        for (i, line) in lines.iter().enumerate() {
            legend.draw(&Text::new(
                line.as_str(),
                (4, y + 16 * i as i32),
                ("sans-serif", 12),
            ))?;
        }
    }
    let panels = plots.split_evenly((measures.len(), 1));
    for (panel, (label, value, fmt, compared)) in panels.iter().zip(measures) {
        let annotate = !pairs.is_empty() && compared;
        let (lo, mut hi) = nice_log_bounds(ok.iter().map(|(_, _, w)| value(w)));
        if annotate {
            // Headroom for the ratios, one line each, above the tallest bar.
            hi *= (hi / lo).powf(0.12 * pairs.len() as f64);
        }
        let mut chart = ChartBuilder::on(panel)
            .caption(label, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < slots.len() {
                    SCENARIOS[slots[i as usize]].name.to_string()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| fmt(*v))
            .label_style(("sans-serif", 12))
            .draw()?;
        for kind in KINDS {
            let (r, g, b) = kind.color();
            let color = RGBColor(r, g, b);
            let bars = ok.iter().filter(|(_, k, _)| *k == kind).map(|(s, _, w)| {
                // This scenario's proxies share 80 % of its slot.
                let present: Vec<Kind> = KINDS
                    .into_iter()
                    .filter(|k| ok.iter().any(|(s2, k2, _)| s2 == s && k2 == k))
                    .collect();
                let j = present.iter().position(|k| *k == kind).unwrap_or(0);
                let width = 0.8 / present.len() as f64;
                let x0 = slot_of(*s) - 0.4 + j as f64 * width;
                Rectangle::new([(x0, lo), (x0 + width * 0.92, value(w))], color.filled())
            });
            chart.draw_series(bars)?;
        }
        if annotate {
            let style = TextStyle::from(("sans-serif", 13).into_font())
                .pos(Pos::new(HPos::Center, VPos::Top));
            for (line, (label, current, baseline)) in pairs.iter().enumerate() {
                let ratios = slots.iter().filter_map(|&s| {
                    let c = result_of(rows, s, *current)?;
                    let b = result_of(rows, s, *baseline)?;
                    let text = format!("{label} {:.2}x", value(c) / value(b));
                    // Each pair on a line of its own, from the top of the panel down.
                    let offset = (0, 16 * line as i32);
                    Some(
                        EmptyElement::at((slot_of(s), hi)) + Text::new(text, offset, style.clone()),
                    )
                });
                chart.draw_series(ratios)?;
            }
        }
    }
    root.present()?;
    Ok(())
}
