//! A minimal SVG line chart: one or more series over a shared x axis, each on its own y scale.

/// One line: a label, a colour and (x, y) points.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders stacked panels (one per series) sharing the x axis (seconds).
pub fn chart(title: &str, x_label: &str, series: &[Series<'_>]) -> String {
    let (w, panel_h, left, right, top) = (900.0, 220.0, 80.0, 20.0, 40.0);
    let h = top + panel_h * series.len() as f64 + 40.0;
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="24" font-size="16" font-weight="bold">{}</text>
"#,
        esc(title)
    );
    for (i, s) in series.iter().enumerate() {
        let y0 = top + panel_h * i as f64;
        let (ph, pw) = (panel_h - 50.0, w - left - right);
        let y_max = s.points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.1;
        out.push_str(&format!(
            r##"<text x="{left}" y="{}" fill="{}" font-weight="bold">{}</text>
<rect x="{left}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>
"##,
            y0 + 14.0,
            s.color,
            esc(s.label),
            y0 + 20.0
        ));
        for k in 0..=4 {
            let v = y_max * f64::from(k) / 4.0;
            let y = y0 + 20.0 + ph - ph * f64::from(k) / 4.0;
            out.push_str(&format!(
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>
"##,
                left + pw,
                left - 6.0,
                y + 4.0,
                if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
            ));
        }
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    left + pw * x / x_max,
                    y0 + 20.0 + ph - ph * y / y_max
                )
            })
            .collect();
        out.push_str(&format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>
"#,
            s.color,
            pts.join(" ")
        ));
    }
    let base = top + panel_h * series.len() as f64;
    for k in 0..=5 {
        let x = left + (w - left - right) * f64::from(k) / 5.0;
        out.push_str(&format!(
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>
"#,
            base - 12.0,
            x_max * f64::from(k) / 5.0
        ));
    }
    out.push_str(&format!(
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
</svg>
"#,
        left + (w - left - right) / 2.0,
        base + 8.0,
        esc(x_label)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_as_a_polyline() {
        let svg = chart(
            "t <1>",
            "s",
            &[
                Series {
                    label: "a",
                    color: "#00f",
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                },
                Series {
                    label: "b",
                    color: "#f00",
                    points: vec![(0.0, 0.0), (2.0, 5.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
