//! A small line chart as inline SVG, drawn by regtee: no script library, no request elsewhere.

use std::fmt::Write as _;

/// One line: its name, its colour, its values (oldest first, evenly spaced in time).
pub(crate) struct Line<'a> {
    pub(crate) name: &'a str,
    pub(crate) colour: &'a str,
    pub(crate) values: Vec<f64>,
}

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 120.0;

/// Each line scaled to its own maximum (backlog and lag differ by orders of magnitude), with its
/// maximum written next to its name.
pub(crate) fn svg(title: &str, lines: &[Line<'_>]) -> String {
    let mut out = format!(
        r##"<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {WIDTH} {h}" width="{WIDTH}" height="{h}" xmlns="http://www.w3.org/2000/svg"><rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="none" stroke="#ccc"/>"##,
        title = super::escape(title),
        h = HEIGHT + 20.0,
    );
    for (i, line) in lines.iter().enumerate() {
        let max = line.values.iter().copied().fold(0.0_f64, f64::max);
        let n = line.values.len();
        if n > 0 {
            let step = if n > 1 { WIDTH / (n - 1) as f64 } else { 0.0 };
            let points: Vec<String> = line
                .values
                .iter()
                .enumerate()
                .map(|(k, v)| {
                    let y = if max > 0.0 {
                        HEIGHT - v / max * (HEIGHT - 4.0)
                    } else {
                        HEIGHT
                    };
                    format!("{:.1},{:.1}", k as f64 * step, y)
                })
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                line.colour,
                points.join(" ")
            );
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="11" fill="{}">{} (max {:.0})</text>"#,
            4.0 + i as f64 * 220.0,
            HEIGHT + 15.0,
            line.colour,
            super::escape(line.name),
            max
        );
    }
    out.push_str("</svg>");
    out
}
