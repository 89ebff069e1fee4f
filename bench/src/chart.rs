//! PNG bar charts of the figures (latency percentiles, memory per connection, rates),
//! drawn with `plotters`' bitmap backend. Text uses the 8x8 font embedded in
//! `font8x8`, so no font file or system library is needed.

use std::path::Path;

use font8x8::UnicodeFonts;
use plotters::prelude::*;

use crate::BenchError;

/// One group of bars (e.g. "p99") with one bar per series (e.g. per target).
#[derive(Debug, Clone)]
pub struct Group {
    /// Label under the group.
    pub label: String,
    /// (series name, value); a missing value is drawn as no bar.
    pub bars: Vec<(String, Option<f64>)>,
}

/// A grouped bar chart.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Title on top.
    pub title: String,
    /// Unit of the values (shown with the axis).
    pub unit: String,
    /// Logarithmic value axis (for latencies spanning decades).
    pub log: bool,
    /// The groups.
    pub groups: Vec<Group>,
}

const W: u32 = 1100;
const H: u32 = 480;
const LEFT: i32 = 90;
const RIGHT: i32 = 20;
const TOP: i32 = 50;
const BOTTOM: i32 = 70;
const PALETTE: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
];

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("chart: {e}"))
}

/// Draws `text` with its top-left corner at (x, y), each font pixel `scale` pixels.
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x: i32,
    y: i32,
    s: &str,
    scale: i32,
    color: &RGBColor,
) -> Result<(), BenchError> {
    for (k, c) in s.chars().enumerate() {
        let c = if c == 'µ' { 'u' } else { c };
        let Some(glyph) = font8x8::BASIC_FONTS.get(c) else {
            continue;
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let (px, py) = (x + (k as i32 * 8 + col) * scale, y + row as i32 * scale);
                    for dx in 0..scale {
                        for dy in 0..scale {
                            area.draw_pixel((px + dx, py + dy), color).map_err(err)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn text_width(s: &str, scale: i32) -> i32 {
    s.chars().count() as i32 * 8 * scale
}

/// `1.2k`, `3.4M`, `850`, `0.5`.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 1e9 => format!("{:.1}G", v / 1e9),
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        a if a >= 1e3 => format!("{:.1}k", v / 1e3),
        a if a >= 10.0 || a == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.2}"),
    }
}

impl BarChart {
    /// Writes the chart as a PNG at `path`.
    pub fn draw(&self, path: &Path) -> Result<(), BenchError> {
        let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        text(&root, LEFT, 14, &self.title, 2, &BLACK)?;
        let values: Vec<f64> = self
            .groups
            .iter()
            .flat_map(|g| g.bars.iter().filter_map(|(_, v)| *v))
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let max = values.iter().copied().fold(0.0, f64::max).max(1e-9);
        let min = values
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(max);
        let (plot_h, plot_w) = (H as i32 - TOP - BOTTOM, W as i32 - LEFT - RIGHT);
        let (lo, hi) = if self.log {
            let lo = min.max(1e-9).log10().floor();
            (lo, max.log10().ceil().max(lo + 1.0))
        } else {
            (0.0, max * 1.1)
        };
        let y_of = |v: f64| -> i32 {
            let t = if self.log {
                (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo)
            } else {
                v / hi
            };
            TOP + plot_h - (t.clamp(0.0, 1.0) * f64::from(plot_h)) as i32
        };
        // Axis, grid lines and tick labels.
        let ticks: Vec<f64> = if self.log {
            (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=5).map(|k| hi * f64::from(k) / 5.0).collect()
        };
        let grey = RGBColor(0xdd, 0xdd, 0xdd);
        for t in ticks {
            let y = y_of(t);
            root.draw(&PathElement::new(vec![(LEFT, y), (LEFT + plot_w, y)], grey))
                .map_err(err)?;
            let label = short(t);
            text(
                &root,
                LEFT - 8 - text_width(&label, 1),
                y - 4,
                &label,
                1,
                &BLACK,
            )?;
        }
        root.draw(&PathElement::new(
            vec![
                (LEFT, TOP),
                (LEFT, TOP + plot_h),
                (LEFT + plot_w, TOP + plot_h),
            ],
            BLACK,
        ))
        .map_err(err)?;
        let unit = format!("{}{}", self.unit, if self.log { " (log)" } else { "" });
        text(&root, 6, TOP - 16, &unit, 1, &BLACK)?;
        // Bars.
        let groups = self.groups.len().max(1) as i32;
        let group_w = plot_w / groups;
        let mut series: Vec<String> = Vec::new();
        for g in &self.groups {
            for (name, _) in &g.bars {
                if !series.contains(name) {
                    series.push(name.clone());
                }
            }
        }
        let bar_w = ((group_w - 20) / series.len().max(1) as i32).max(2);
        for (gi, g) in self.groups.iter().enumerate() {
            let x0 = LEFT + gi as i32 * group_w + 10;
            for (name, value) in &g.bars {
                let si = series.iter().position(|s| s == name).unwrap_or(0);
                let Some(v) = value.filter(|v| v.is_finite() && *v > 0.0) else {
                    continue;
                };
                let (x, y) = (x0 + si as i32 * bar_w, y_of(v));
                let color = PALETTE[si % PALETTE.len()];
                root.draw(&Rectangle::new(
                    [(x + 1, y), (x + bar_w - 2, TOP + plot_h - 1)],
                    color.filled(),
                ))
                .map_err(err)?;
                let label = short(v);
                let lx = x + (bar_w - text_width(&label, 1)) / 2;
                text(&root, lx, y - 11, &label, 1, &BLACK)?;
            }
            let lx = x0 + (group_w - 20 - text_width(&g.label, 1)) / 2;
            text(&root, lx, TOP + plot_h + 8, &g.label, 1, &BLACK)?;
        }
        // Legend.
        let mut lx = LEFT;
        for (si, name) in series.iter().enumerate() {
            let color = PALETTE[si % PALETTE.len()];
            let y = H as i32 - 28;
            root.draw(&Rectangle::new(
                [(lx, y), (lx + 12, y + 10)],
                color.filled(),
            ))
            .map_err(err)?;
            text(&root, lx + 18, y + 1, name, 1, &BLACK)?;
            lx += 40 + text_width(name, 1);
        }
        root.present().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.png");
        let chart = BarChart {
            title: "p2p latency".into(),
            unit: "µs".into(),
            log: true,
            groups: vec![Group {
                label: "p99".into(),
                bars: vec![("tether".into(), Some(900.0)), ("nats".into(), Some(120.0))],
            }],
        };
        chart.draw(&path).expect("draws");
        let bytes = std::fs::read(&path).expect("written");
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
