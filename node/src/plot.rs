//! `swarmtune status --plot`: eval loss per module version as an SVG.

use std::path::Path;

use plotters::prelude::*;

/// Draws `(version, eval loss)` points as a line with markers into `path`.
pub fn eval_loss_svg(path: &Path, title: &str, points: &[(u64, f64)]) -> anyhow::Result<()> {
    anyhow::ensure!(!points.is_empty(), "no version has an eval loss yet");
    let mut points = points.to_vec();
    points.sort_by_key(|p| p.0);
    let points = points.as_slice();
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| {
            (lo.min(l), hi.max(l))
        });
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let last = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let first = points.iter().map(|p| p.0).min().unwrap_or(0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(first..last, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("module version")
        .y_desc("eval loss (nats/token)")
        .draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
    chart.draw_series(
        points
            .iter()
            .map(|&(v, l)| Circle::new((v, l), 4, BLUE.filled())),
    )?;
    root.present()?;
    Ok(())
}
