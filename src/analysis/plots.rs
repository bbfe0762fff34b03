//! The analysis figures, as PNG and SVG, drawn with plotters in pure Rust. Text uses the DejaVu
//! Sans font bundled in `assets/` (registered with plotters' ab_glyph backend), so no system
//! font or fontconfig is needed.
//!
//! Every figure is a function over a generic plotters drawing area, rendered twice (bitmap and
//! SVG) by the `render!` macro. Heatmaps quantise their colour scale to 64 levels; in the bitmap
//! they are drawn cell by cell (equal neighbours merged), in the SVG as one embedded PNG image
//! each (8 attention maps as rectangles would be 8.6 MB of SVG; as images 0.4 MB).

use super::{Analysis, AnalysisArrays};
use crate::error::{Error, Result};
use ndarray::{s, ArrayView2};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| Error::Plot("the bundled font could not be parsed".into()));
    });
    result
}

fn pe<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Plot(e.to_string())
}

/// What the figures show: an analysis, its arrays, and the run's per-epoch losses.
pub struct PlotData<'a> {
    /// The analysis to draw.
    pub analysis: &'a Analysis,
    /// Its arrays.
    pub arrays: &'a AnalysisArrays,
    /// The run's train loss per epoch.
    pub train_losses: &'a [f64],
    /// The run's logged test losses (see `test_every`).
    pub test_losses: &'a [f64],
    /// Epochs between two test losses (`tlens train --eval-every`, the 2022 code's 10 for
    /// some runs); `None` when the file does not say, and then no test curve is drawn.
    pub test_every: Option<usize>,
}

/// A figure's temporary path beside `path` (renamed over it once complete), as run files are
/// written: a full disk or a kill never leaves a truncated figure under the real name.
fn temp_of(path: &Path) -> PathBuf {
    // `.NAME.tmp<pid>.EXT`: the image encoder picks its format from the extension.
    let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned());
    let ext = path.extension().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{}.tmp{}.{}",
        stem.unwrap_or_default(),
        std::process::id(),
        ext.unwrap_or_default()
    ))
}

/// Move a finished temporary figure into place; on failure remove it. Errors name the figure.
fn commit(tmp: &Path, path: &Path, drawn: Result<()>) -> Result<()> {
    let res = drawn.and_then(|_| std::fs::rename(tmp, path).map_err(Error::from));
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res.map_err(|e| e.in_file(path))
}

/// Draw one figure into `dir/name.png` and `dir/name.svg` (each written to a temporary file
/// and renamed into place).
macro_rules! render {
    ($dir:expr, $name:expr, $size:expr, $out:expr, |$area:ident| $body:expr) => {{
        let png = $dir.join(format!("{}.png", $name));
        let tmp = temp_of(&png);
        let drawn = (|| -> Result<()> {
            let $area = BitMapBackend::new(&tmp, $size).into_drawing_area();
            $area.fill(&WHITE).map_err(pe)?;
            $body?;
            $area.present().map_err(pe)?;
            Ok(())
        })();
        commit(&tmp, &png, drawn)?;
        let svg = $dir.join(format!("{}.svg", $name));
        let tmp = temp_of(&svg);
        let drawn = (|| -> Result<()> {
            SVG_IMAGES.with(|c| *c.borrow_mut() = Some(Vec::new()));
            let $area = SVGBackend::new(&tmp, $size).into_drawing_area();
            $area.fill(&WHITE).map_err(pe)?;
            let drawn: Result<()> = $body;
            $area.present().map_err(pe)?;
            drop($area);
            let images = SVG_IMAGES
                .with(|c| c.borrow_mut().take())
                .unwrap_or_default();
            drawn?;
            splice_images(&tmp, &images)
        })();
        commit(&tmp, &svg, drawn)?;
        $out.push(png);
        $out.push(svg);
    }};
}

/// Write every figure to `dir` (created if needed); returns the files written.
pub fn write_all(dir: &Path, d: &PlotData) -> Result<Vec<PathBuf>> {
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    let mut out = Vec::new();
    let a = d.analysis;
    if !d.train_losses.is_empty() {
        render!(dir, "loss_curves", (900, 560), out, |area| loss_curves(
            &area, d
        ));
    }
    render!(dir, "embedding_fourier_norms", (1000, 480), out, |area| {
        embedding_norms(&area, d)
    });
    render!(dir, "neuron_freq_heatmap", (1100, 560), out, |area| {
        neuron_heatmap(&area, d)
    });
    render!(dir, "neuron_clusters", (900, 480), out, |area| clusters(
        &area, a
    ));
    if !a.checkpoints.is_empty() {
        render!(dir, "progress_losses", (900, 560), out, |area| {
            progress_losses(&area, d)
        });
        render!(dir, "logit_cos_sim", (900, 560), out, |area| {
            cos_sim_over_epochs(&area, d)
        });
        render!(dir, "gini_and_weights", (1100, 440), out, |area| {
            gini_and_weights(&area, d)
        });
        render!(dir, "accuracy", (900, 520), out, |area| accuracy(&area, d));
    }
    render!(dir, "attention_patterns", (1300, 660), out, |area| {
        attention(&area, d)
    });
    if !d.arrays.neuron_example_ids.is_empty() {
        let rows = d.arrays.neuron_example_ids.len().div_ceil(2) as u32;
        render!(
            dir,
            "neuron_activations",
            (820, 60 + 330 * rows),
            out,
            |area| { neuron_examples(&area, d) }
        );
    }
    render!(dir, "signal_chain_spectra", (1200, 720), out, |area| {
        signal_chain(&area, d)
    });
    if !d.arrays.embed_circle_freqs.is_empty() {
        render!(dir, "embedding_circles", (1300, 380), out, |area| {
            embedding_circles(&area, d)
        });
    }
    Ok(out)
}

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().into()
}

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const TEST: RGBColor = RGBColor(214, 39, 40);
const RESTRICTED: RGBColor = RGBColor(44, 160, 44);
const EXCLUDED: RGBColor = RGBColor(148, 103, 189);
const PHASE: RGBColor = RGBColor(90, 90, 90);
const PHASE_MEM: RGBColor = RGBColor(140, 86, 75);
const PHASE_CLEAN: RGBColor = RGBColor(23, 150, 170);
const SERIES: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return 1e-3..1.0;
    }
    lo / 2.0..hi * 2.0
}

/// Vertical dashed lines at the phase boundaries, with labels.
fn phase_lines<'a, DB: DrawingBackend + 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    a: &Analysis,
    y: (f64, f64),
) -> Result<()> {
    let ph = a.phases;
    // One style per boundary (colour and dash pattern), drawn the same in the legend.
    for (epoch, label, color, dash, gap) in [
        (
            ph.memorization_end,
            "memorisation ends",
            PHASE_MEM,
            8u32,
            4u32,
        ),
        (ph.circuit_formation_end, "circuit formed", PHASE, 2, 3),
        (ph.cleanup_end, "clean-up ends", PHASE_CLEAN, 12, 3),
    ] {
        if let Some(e) = epoch {
            let x = e as f64;
            let style = color.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x, y.0), (x, y.1)],
                    dash,
                    gap,
                    style,
                ))
                .map_err(pe)?
                .label(format!("{label} (epoch {e})"))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], dash, gap, style)
                });
        }
    }
    Ok(())
}

/// The three phases as shaded bands (memorisation, circuit formation, clean-up), named at the
/// top of the plot, as in the paper's figure of the restricted and excluded loss.
fn phase_bands<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<
            plotters::coord::types::RangedCoordf64,
            plotters::coord::combinators::LogCoord<f64>,
        >,
    >,
    a: &Analysis,
    x_max: f64,
    y: (f64, f64),
) -> Result<()> {
    let ph = a.phases;
    let edges = [
        Some(0i64),
        ph.memorization_end,
        ph.circuit_formation_end,
        ph.cleanup_end,
    ];
    let bands = [
        ("memorisation", PHASE_MEM),
        ("circuit formation", PHASE),
        ("clean-up", PHASE_CLEAN),
    ];
    for (i, (name, color)) in bands.iter().enumerate() {
        let (Some(x0), Some(x1)) = (edges[i], edges[i + 1]) else {
            continue;
        };
        let (x0, x1) = (x0 as f64, (x1 as f64).min(x_max));
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, y.0), (x1, y.1)],
                color.mix(0.10).filled(),
            )))
            .map_err(pe)?;
        // Staggered heights, so that a narrow band's name does not run into the next one's.
        let at = y.1 / (1.8 * 4f64.powi(i as i32));
        chart
            .draw_series(std::iter::once(Text::new(
                name.to_string(),
                (x0 + x_max * 0.005, at),
                font(13).color(color),
            )))
            .map_err(pe)?;
    }
    Ok(())
}

fn downsample(v: &[f64], max_points: usize) -> Vec<(f64, f64)> {
    let step = (v.len() / max_points).max(1);
    v.iter()
        .enumerate()
        .step_by(step)
        .map(|(i, &l)| (i as f64, l))
        .collect()
}

fn loss_curves<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let n = d.train_losses.len() as f64;
    let y = log_range(d.train_losses.iter().chain(d.test_losses).copied());
    let mut chart = ChartBuilder::on(area)
        .caption("Training curve for modular addition", font(22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, y.clone().log_scale())
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("loss (log scale)")
        .label_style(font(13))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(pe)?;
    labelled_line(&mut chart, downsample(d.train_losses, 2000), TRAIN, "train")?;
    if let Some(k) = d.test_every {
        // Test loss i was taken at epoch i·k.
        let pts: Vec<(f64, f64)> = downsample(d.test_losses, 2000)
            .into_iter()
            .map(|(i, l)| (i * k as f64, l))
            .collect();
        labelled_line(&mut chart, pts, TEST, "test")?;
    }
    phase_lines(&mut chart, d.analysis, (y.start, y.end))?;
    legend(&mut chart)
}

/// One labelled line (2 px, with its legend entry).
fn labelled_line<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    points: impl IntoIterator<Item = (f64, f64)>,
    color: RGBColor,
    label: impl Into<String>,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(pe)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, C: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, C>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(font(13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(pe)
}

fn embedding_norms<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let norms = &d.arrays.embed_fourier_norms;
    let max = norms.iter().copied().fold(0f32, f32::max) as f64 * 1.1;
    let p = norms.len();
    let mut chart = ChartBuilder::on(area)
        .caption("Norms of the embedding in the Fourier basis", font(22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..p as f64, 0f64..max.max(1e-9))
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("Fourier component (0 constant, 2k-1 sin k, 2k cos k)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("norm")
        .label_style(font(13))
        .draw()
        .map_err(pe)?;
    let keys = &d.analysis.key_freqs;
    chart
        .draw_series(norms.iter().enumerate().map(|(i, &v)| {
            let k = i.div_ceil(2);
            let color = if i > 0 && keys.contains(&k) {
                TEST
            } else {
                TRAIN
            };
            Rectangle::new(
                [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, v as f64)],
                color.filled(),
            )
        }))
        .map_err(pe)?;
    let mut labels = Vec::new();
    for &k in keys {
        labels.push(Text::new(
            format!("k={k}"),
            (
                (2 * k) as f64 - 1.5,
                norms[2 * k - 1].max(norms[2 * k]) as f64 * 1.02 + max * 0.02,
            ),
            font(13),
        ));
    }
    chart.draw_series(labels).map_err(pe)?;
    Ok(())
}

/// Map t ∈ [0, 1] to a viridis-like colour (5 stops, linear between them).
fn colormap(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    } * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

thread_local! {
    /// While an SVG is drawn: heatmaps to embed as PNG images (position, size, PNG bytes).
    static SVG_IMAGES: std::cell::RefCell<Option<Vec<SvgImage>>> = const { std::cell::RefCell::new(None) };
}

struct SvgImage {
    x: i32,
    y: i32,
    w: i32,
    h: i32,
    png: Vec<u8>,
}

/// Insert the collected heatmap images into a written SVG (before `</svg>`).
fn splice_images(path: &Path, images: &[SvgImage]) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let mut text = std::fs::read_to_string(path).map_err(|e| Error::from(e).in_file(path))?;
    let end = text
        .rfind("</svg>")
        .ok_or_else(|| Error::Plot(format!("{}: no </svg> in the SVG written", path.display())))?;
    let mut ins = String::new();
    for im in images {
        ins.push_str(&format!(
            "<image x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" preserveAspectRatio=\"none\" style=\"image-rendering:pixelated\" href=\"data:image/png;base64,{}\"/>\n",
            im.x, im.y, im.w, im.h, base64(&im.png)
        ));
    }
    text.insert_str(end, &ins);
    std::fs::write(path, text).map_err(|e| Error::from(e).in_file(path))
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An RGB image of the heatmap, one pixel per cell, top row = last row of `values`.
fn heatmap_png(values: ArrayView2<f32>, color: impl Fn(f32) -> RGBColor) -> Result<Vec<u8>> {
    let (rows, cols) = values.dim();
    let mut data = Vec::with_capacity(rows * cols * 3);
    for r in (0..rows).rev() {
        for c in 0..cols {
            let RGBColor(red, g, b) = color(values[[r, c]]);
            data.extend_from_slice(&[red, g, b]);
        }
    }
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, cols as u32, rows as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| Error::Plot(e.to_string()))?;
        w.write_image_data(&data)
            .map_err(|e| Error::Plot(e.to_string()))?;
    }
    Ok(buf)
}

/// Draw `values` [rows, cols] as a heatmap on a chart whose x is the column and y the row,
/// colours scaled to [lo, hi] and quantised to 64 levels; equal runs along a row merge.
fn heatmap<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    values: ArrayView2<f32>,
    lo: f64,
    hi: f64,
) -> Result<()> {
    let level = |v: f32| (((v as f64 - lo) / (hi - lo).max(1e-30)).clamp(0.0, 1.0) * 63.0).round();
    let svg = SVG_IMAGES.with(|c| c.borrow().is_some());
    if svg {
        // Vector output: one embedded image instead of thousands of rectangles.
        let (xr, yr) = chart.plotting_area().get_pixel_range();
        let png = heatmap_png(values, |v| colormap(level(v) / 63.0))?;
        SVG_IMAGES.with(|c| {
            if let Some(list) = c.borrow_mut().as_mut() {
                list.push(SvgImage {
                    x: xr.start,
                    y: yr.start,
                    w: xr.end - xr.start,
                    h: yr.end - yr.start,
                    png,
                });
            }
        });
        return Ok(());
    }
    let mut rects = Vec::new();
    for (r, row) in values.outer_iter().enumerate() {
        let mut start = 0;
        while start < row.len() {
            let l = level(row[start]);
            let mut end = start + 1;
            while end < row.len() && level(row[end]) == l {
                end += 1;
            }
            rects.push(Rectangle::new(
                [(start as f64, r as f64), (end as f64, r as f64 + 1.0)],
                colormap(l / 63.0).filled(),
            ));
            start = end;
        }
    }
    chart.draw_series(rects).map_err(pe)?;
    Ok(())
}

fn neuron_heatmap<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    // Neurons sorted by (dominant frequency, fraction explained) so clusters form blocks.
    let nfn = &d.arrays.neuron_freq_norm;
    let (n_freqs, d_mlp) = nfn.dim();
    let mut order: Vec<usize> = (0..d_mlp).collect();
    let neurons = &d.analysis.neurons;
    order.sort_by(|&a, &b| {
        neurons[a].freq.cmp(&neurons[b].freq).then(
            neurons[b]
                .frac_explained
                .total_cmp(&neurons[a].frac_explained),
        )
    });
    let sorted = ndarray::Array2::from_shape_fn((n_freqs, d_mlp), |(k, j)| nfn[[k, order[j]]]);
    let (main, bar) = area.split_horizontally(area.dim_in_pixel().0 - 110);
    let keys = d.analysis.key_freqs.clone();
    let mut chart = ChartBuilder::on(&main)
        .caption(
            "Fraction of each neuron's variance explained by each frequency (neurons sorted by frequency)",
            font(18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..d_mlp as f64, 0f64..n_freqs as f64)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("neuron (sorted by dominant frequency)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("frequency k (key frequencies labelled)")
        // One tick per row, labelled only at the key frequencies (row k−1 holds frequency k).
        .y_labels(n_freqs + 1)
        .y_label_formatter(&|v| {
            let k = v.round() as usize + 1;
            if (v - v.round()).abs() < 1e-6 && keys.contains(&k) {
                format!("k={k}")
            } else {
                String::new()
            }
        })
        .label_style(font(13))
        .draw()
        .map_err(pe)?;
    heatmap(&mut chart, sorted.view(), 0.0, 1.0)?;
    colorbar(&bar, 0.0, 1.0, "fraction of variance")
}

/// A vertical colour bar for values lo..hi, labelled (what the colour means, with units).
fn colorbar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    lo: f64,
    hi: f64,
    label: &str,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(40)
        .margin_bottom(50)
        .margin_right(6)
        .y_label_area_size(62)
        .build_cartesian_2d(0f64..1.0, lo..hi)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(label)
        .axis_desc_style(font(12))
        .label_style(font(12))
        .y_label_formatter(&|v| {
            if hi - lo >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .draw()
        .map_err(pe)?;
    let n = 64;
    chart
        .draw_series((0..n).map(|i| {
            let y0 = lo + (hi - lo) * i as f64 / n as f64;
            let y1 = lo + (hi - lo) * (i + 1) as f64 / n as f64;
            Rectangle::new(
                [(0.0, y0), (1.0, y1)],
                colormap(i as f64 / (n - 1) as f64).filled(),
            )
        }))
        .map_err(pe)?;
    Ok(())
}

fn clusters<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, a: &Analysis) -> Result<()> {
    let n_freqs = a.p / 2;
    let mut counts = vec![0usize; n_freqs + 1];
    for c in &a.clusters {
        counts[c.freq] = c.neurons.len();
    }
    let max = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.15;
    let explained: usize = counts.iter().sum();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "Neuron clusters: {explained} of {} neurons explained > 85% by one frequency",
                a.neurons.len()
            ),
            font(20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(n_freqs + 1) as f64, 0f64..max)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("frequency k")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("neurons in the cluster")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(font(13))
        .draw()
        .map_err(pe)?;
    chart
        .draw_series(counts.iter().enumerate().skip(1).map(|(k, &c)| {
            let color = if a.key_freqs.contains(&k) {
                TEST
            } else {
                TRAIN
            };
            Rectangle::new(
                [(k as f64 - 0.4, 0.0), (k as f64 + 0.4, c as f64)],
                color.filled(),
            )
        }))
        .map_err(pe)?;
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(k, &c)| {
                    Text::new(
                        format!("{k}: {c}"),
                        (k as f64 - 1.2, c as f64 + max * 0.02),
                        font(13),
                    )
                }),
        )
        .map_err(pe)?;
    Ok(())
}

fn progress_losses<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let a = d.analysis;
    let ck = &a.checkpoints;
    let x_max = ck.last().map(|c| c.epoch as f64).unwrap_or(1.0).max(1.0);
    let y = log_range(ck.iter().flat_map(|c| {
        [
            c.train_loss,
            c.test_loss,
            c.restricted_loss,
            c.excluded_loss,
        ]
    }));
    let mut chart = ChartBuilder::on(area)
        .caption("Restricted and excluded loss over training", font(22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, y.clone().log_scale())
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("loss (log scale)")
        .label_style(font(13))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(pe)?;
    phase_bands(&mut chart, a, x_max, (y.start, y.end))?;
    type Get = fn(&super::CheckpointMeasures) -> f64;
    let series: [(&str, RGBColor, Get); 4] = [
        ("train", TRAIN, |c| c.train_loss),
        ("test", TEST, |c| c.test_loss),
        ("restricted", RESTRICTED, |c| c.restricted_loss),
        ("excluded", EXCLUDED, |c| c.excluded_loss),
    ];
    for (label, color, get) in series {
        let points = ck.iter().map(|c| (c.epoch as f64, get(c)));
        labelled_line(&mut chart, points, color, label)?;
    }
    phase_lines(&mut chart, a, (y.start, y.end))?;
    legend(&mut chart)
}

fn cos_sim_over_epochs<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    d: &PlotData,
) -> Result<()> {
    let a = d.analysis;
    let cs = &d.arrays.logit_cos_sim;
    let epochs = &d.arrays.checkpoint_epochs;
    let x_max = epochs.iter().copied().max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Cosine similarity of the logits with cos(k(a+b-c))",
            font(22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("cosine similarity")
        .label_style(font(13))
        .draw()
        .map_err(pe)?;
    // Other frequencies in light grey, key frequencies in colour.
    for k in 1..=cs.ncols() {
        if a.key_freqs.contains(&k) {
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                epochs
                    .iter()
                    .zip(cs.column(k - 1))
                    .map(|(&e, &v)| (e as f64, v.abs())),
                RGBColor(200, 200, 200).stroke_width(1),
            ))
            .map_err(pe)?;
    }
    for (i, &k) in a.key_freqs.iter().enumerate() {
        let color = SERIES[i % SERIES.len()];
        let points = epochs
            .iter()
            .zip(cs.column(k - 1))
            .map(|(&e, &v)| (e as f64, v.abs()));
        labelled_line(&mut chart, points, color, format!("k = {k}"))?;
    }
    phase_lines(&mut chart, a, (0.0, 1.0))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(font(13))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(pe)
}

fn gini_and_weights<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let a = d.analysis;
    let ck = &a.checkpoints;
    let x_max = ck.last().map(|c| c.epoch as f64).unwrap_or(1.0).max(1.0);
    let (left, right) = area.split_horizontally(area.dim_in_pixel().0 / 2);
    let mut chart = ChartBuilder::on(&left)
        .caption("Gini coefficient of Fourier norms", font(18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("Gini coefficient (0 spread, 1 one frequency)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(font(12))
        .draw()
        .map_err(pe)?;
    type Get = fn(&super::CheckpointMeasures) -> f64;
    let series: [(&str, RGBColor, Get); 2] = [
        ("W_E", TRAIN, |c| c.gini_w_e),
        ("W_L", TEST, |c| c.gini_w_l),
    ];
    for (label, color, get) in series {
        let points = ck.iter().map(|c| (c.epoch as f64, get(c)));
        labelled_line(&mut chart, points, color, label)?;
    }
    phase_lines(&mut chart, a, (0.0, 1.0))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .label_font(font(12))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(pe)?;
    let y_max = ck.iter().map(|c| c.sum_sq_weights).fold(0.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption("Total sum of squared weights", font(18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(1e-9))
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("sum of squared parameters")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(font(12))
        .draw()
        .map_err(pe)?;
    chart
        .draw_series(LineSeries::new(
            ck.iter().map(|c| (c.epoch as f64, c.sum_sq_weights)),
            RESTRICTED.stroke_width(2),
        ))
        .map_err(pe)?;
    phase_lines(&mut chart, a, (0.0, y_max))?;
    Ok(())
}

fn attention<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let pats = &d.arrays.attention_patterns; // [H, 2, p, p]
    let (h, _, p, _) = pats.dim();
    let (title, body) = area.split_vertically(36);
    title
        .draw_text(
            "Attention from '=' to a (top row) and to b (bottom row), per head; a down, b across",
            &font(18),
            (12, 8),
        )
        .map_err(pe)?;
    let (grid, bar) = body.split_horizontally(body.dim_in_pixel().0 - 100);
    let cells = grid.split_evenly((2, h));
    for (i, cell) in cells.iter().enumerate() {
        let (key, head) = (i / h, i % h);
        grid_heatmap(
            cell,
            &format!(
                "head {head}, attention to {}",
                if key == 0 { "a" } else { "b" }
            ),
            pats.slice(s![head, key, .., ..]),
            (0.0, 1.0),
            p,
        )?;
    }
    colorbar(&bar, 0.0, 1.0, "attention weight")
}

/// A p × p heatmap over the inputs with a down and b across (a = 0 at the top, as the paper
/// draws them), axes named.
fn grid_heatmap<DB: DrawingBackend>(
    cell: &DrawingArea<DB, Shift>,
    caption: &str,
    values: ArrayView2<f32>,
    range: (f64, f64),
    p: usize,
) -> Result<()> {
    let mut chart = ChartBuilder::on(cell)
        .caption(caption, font(13))
        .margin(6)
        .x_label_area_size(30)
        .y_label_area_size(36)
        .build_cartesian_2d(0f64..p as f64, 0f64..p as f64)
        .map_err(pe)?;
    let pf = p as f64;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("b")
        .y_desc("a")
        .axis_desc_style(font(11))
        .label_style(font(10))
        .x_labels(3)
        // A tick per row (marks hidden), labelled where a is a multiple of 50: row r of the
        // flipped array, drawn at height r, holds a = p − 1 − r.
        .y_labels(p + 1)
        .set_tick_mark_size(LabelAreaPosition::Left, 0)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&move |v| {
            let a = pf - 1.0 - v.round();
            if (v - v.round()).abs() < 1e-6 && a >= 0.0 && a % 50.0 == 0.0 {
                format!("{a:.0}")
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(pe)?;
    let flipped = values.slice(s![..;-1, ..]);
    heatmap(&mut chart, flipped, range.0, range.1)
}

/// Activations of example neurons of the largest clusters over all inputs (a down, b across):
/// the periodic patterns of the paper's neuron figure, one row per cluster.
fn neuron_examples<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let ex = &d.arrays.neuron_examples; // [n, p, p]
    let ids = &d.arrays.neuron_example_ids;
    let (n, p, _) = ex.dim();
    let (title, body) = area.split_vertically(36);
    title
        .draw_text(
            "Activations of example neurons of each cluster over the inputs (a down, b across)",
            &font(18),
            (12, 8),
        )
        .map_err(pe)?;
    let hi = ex.iter().copied().fold(0f32, f32::max).max(1e-6) as f64;
    let (grid, bar) = body.split_horizontally(body.dim_in_pixel().0 - 100);
    let cols = n.clamp(1, 2);
    let rows = n.div_ceil(cols).max(1);
    let cells = grid.split_evenly((rows, cols));
    for (i, cell) in cells.iter().enumerate().take(n) {
        let (neuron, freq) = ids[i];
        grid_heatmap(
            cell,
            &format!("neuron {neuron} (frequency k = {freq})"),
            ex.slice(s![i, .., ..]),
            (0.0, hi),
            p,
        )?;
    }
    colorbar(&bar, 0.0, hi, "activation (after ReLU)")
}

/// Train and test accuracy at each checkpoint, with the phase boundaries.
fn accuracy<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let a = d.analysis;
    let ck = &a.checkpoints;
    let x_max = ck.last().map(|c| c.epoch as f64).unwrap_or(1.0).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption("Train and test accuracy over training", font(22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..1.05)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("accuracy (fraction correct)")
        .label_style(font(13))
        .draw()
        .map_err(pe)?;
    for (label, color, acc) in [
        (
            "train",
            TRAIN,
            ck.iter().map(|c| c.train_accuracy).collect::<Vec<_>>(),
        ),
        ("test", TEST, ck.iter().map(|c| c.test_accuracy).collect()),
    ] {
        let pts: Vec<(f64, f64)> = ck
            .iter()
            .zip(acc)
            .map(|(c, v)| (c.epoch as f64, v))
            .collect();
        labelled_line(&mut chart, pts.clone(), color, label)?;
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(pe)?;
    }
    phase_lines(&mut chart, a, (0.0, 1.05))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(font(13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(pe)
}

fn signal_chain<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PlotData) -> Result<()> {
    let a = d.analysis;
    let (title, body) = area.split_vertically(36);
    let f = &a.final_.key_freq_power_fraction;
    title
        .draw_text(
            &format!(
                "Signal chain: share of power per frequency (key frequencies in red) - key share W_E {:.3}, x1 {:.3}, x2 {:.3}, W_L {:.3}",
                f.w_e, f.x1, f.x2, f.w_l
            ),
            &font(15),
            (12, 8),
        )
        .map_err(pe)?;
    let cells = body.split_evenly((2, 2));
    let names = [
        ("W_E", "embedding W_E (over a)"),
        ("x1", "x1: residual after attention (over a, b)"),
        ("x2", "x2: residual after the MLP (over a, b)"),
        ("W_L", "W_L = W_out W_U (over c)"),
    ];
    for (cell, (key, label)) in cells.iter().zip(names) {
        let spec = &d
            .arrays
            .spectra
            .iter()
            .find(|(n, _)| *n == key)
            .expect("every stage has a spectrum")
            .1;
        let total: f64 = spec.iter().skip(1).sum();
        let share: Vec<f64> = spec.iter().skip(1).map(|v| v / total.max(1e-300)).collect();
        let max = share.iter().copied().fold(0.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(cell)
            .caption(label, font(15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..(share.len() + 1) as f64, 0f64..max.max(1e-9))
            .map_err(pe)?;
        chart
            .configure_mesh()
            .x_desc("frequency k")
            .y_desc("share of power")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(font(11))
            .draw()
            .map_err(pe)?;
        chart
            .draw_series(share.iter().enumerate().map(|(i, &v)| {
                let k = i + 1;
                let color = if a.key_freqs.contains(&k) {
                    TEST
                } else {
                    TRAIN
                };
                Rectangle::new([(k as f64 - 0.4, 0.0), (k as f64 + 0.4, v)], color.filled())
            }))
            .map_err(pe)?;
    }
    Ok(())
}

/// A general line chart (PNG + SVG at `path` with the two extensions): one line per series,
/// optionally with a log-scale y axis. For scripts that plot their own measures.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<Vec<PathBuf>> {
    register_font()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| Error::Plot(format!("{}: no file name", path.display())))?;
    let mut out = Vec::new();
    let xs = || series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let x = xs().fold(f64::INFINITY, f64::min)..xs().fold(f64::NEG_INFINITY, f64::max).max(1e-9);
    let ys = || series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    render!(dir, name, (900, 560), out, |area| {
        if log_y {
            let y = log_range(ys());
            let mut chart = ChartBuilder::on(&area)
                .caption(title, font(22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x.clone(), y.log_scale())
                .map_err(pe)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0e}"))
                .label_style(font(13))
                .draw()
                .map_err(pe)?;
            draw_lines(&mut chart, series)
        } else {
            let (lo, hi) = (
                ys().fold(f64::INFINITY, f64::min),
                ys().fold(f64::NEG_INFINITY, f64::max),
            );
            let pad = ((hi - lo) * 0.05).max(1e-9);
            let mut chart = ChartBuilder::on(&area)
                .caption(title, font(22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x.clone(), lo - pad..hi + pad)
                .map_err(pe)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .label_style(font(13))
                .draw()
                .map_err(pe)?;
            draw_lines(&mut chart, series)
        }
    });
    Ok(out)
}

fn draw_lines<
    'a,
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    for (i, (label, points)) in series.iter().enumerate() {
        let color = SERIES[i % SERIES.len()];
        labelled_line(chart, points.iter().copied(), color, *label)?;
    }
    legend(chart)
}

/// Each token's embedding on the directions of W_E's cos k and sin k components, per key
/// frequency: circles, coloured by k·a mod p (smooth around a circle when the model uses k).
fn embedding_circles<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    d: &PlotData,
) -> Result<()> {
    let a = d.analysis;
    let circles = &d.arrays.embed_key_circles; // [n_keys, p, 2]
    let (n_keys, p, _) = circles.dim();
    let (title, body) = area.split_vertically(36);
    title
        .draw_text(
            if a.key_freqs.is_empty() {
                "Each token a's embedding on W_E's cos k / sin k directions, top-power frequencies (no key frequencies yet)"
            } else {
                "Each token a's embedding on W_E's cos k / sin k directions, per key frequency (equal axes)"
            },
            &font(16),
            (12, 8),
        )
        .map_err(pe)?;
    let (body, bar) = body.split_horizontally(body.dim_in_pixel().0 - 100);
    colorbar(&bar, 0.0, (p.max(2) - 1) as f64, "k·a mod p")?;
    let cells = body.split_evenly((1, n_keys.max(1)));
    for (i, cell) in cells.iter().enumerate().take(n_keys) {
        let k = d.arrays.embed_circle_freqs[i];
        let pts: Vec<(f64, f64)> = (0..p)
            .map(|t| (circles[[i, t, 0]] as f64, circles[[i, t, 1]] as f64))
            .collect();
        let r = pts
            .iter()
            .map(|(x, y)| x.abs().max(y.abs()))
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.15;
        // Equal aspect: the axis with more pixels gets the wider range.
        let build = |rx: f64, ry: f64| {
            ChartBuilder::on(cell)
                .caption(format!("k = {k}"), font(14))
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(40)
                .build_cartesian_2d(-rx..rx, -ry..ry)
        };
        let probe = build(r, r).map_err(pe)?;
        let (xr, yr) = probe.plotting_area().get_pixel_range();
        let (w, h) = (
            (xr.end - xr.start).max(1) as f64,
            (yr.end - yr.start).max(1) as f64,
        );
        drop(probe);
        let mut chart = if w >= h {
            build(r * w / h, r)
        } else {
            build(r, r * h / w)
        }
        .map_err(pe)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("cos k")
            .y_desc("sin k")
            .label_style(font(10))
            .x_labels(3)
            .y_labels(3)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(pe)?;
        chart
            .draw_series(pts.iter().enumerate().map(|(t, &(x, y))| {
                let phase = (k * t % p) as f64 / (p - 1) as f64;
                Circle::new((x, y), 3, colormap(phase).filled())
            }))
            .map_err(pe)?;
    }
    Ok(())
}

/// A sweep's phase diagram: the grokking epoch (first epoch with test accuracy ≥ 99%, the
/// median over the runs that share the cell, e.g. several seeds) over two swept axes; cells
/// where no run grokked are grey and say "never". Written as `dir/phase_diagram.{png,svg}`.
pub fn write_phase_diagram(
    dir: &Path,
    rows: &[crate::train::sweep::RunSummary],
    x: &str,
    y: &str,
) -> Result<Vec<PathBuf>> {
    use crate::train::sweep::axis_value;
    register_font()?;
    let values = |axis: &str| {
        let mut v: Vec<f64> = rows.iter().filter_map(|r| axis_value(r, axis)).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    let (xs, ys) = (values(x), values(y));
    // Median grokking epoch per cell (None: no run of the cell grokked; runs that did not
    // grok count as never).
    let cell = |xi: usize, yi: usize| -> (Option<f64>, usize) {
        let mut g: Vec<f64> = Vec::new();
        let mut n = 0;
        for r in rows {
            if axis_value(r, x) == Some(xs[xi]) && axis_value(r, y) == Some(ys[yi]) {
                n += 1;
                if let Some(e) = r.grokking_epoch {
                    g.push(e as f64);
                }
            }
        }
        if g.len() * 2 <= n || g.is_empty() {
            return (None, n);
        }
        g.sort_by(f64::total_cmp);
        (Some(g[g.len() / 2]), n)
    };
    let hi = (0..xs.len())
        .flat_map(|i| (0..ys.len()).map(move |j| (i, j)))
        .filter_map(|(i, j)| cell(i, j).0)
        .fold(1.0f64, f64::max);
    let mut out = Vec::new();
    let fmt = |v: f64| {
        if v.fract() == 0.0 && v.abs() < 1e6 {
            format!("{v:.0}")
        } else {
            format!("{v}")
        }
    };
    let (xs_l, ys_l): (Vec<String>, Vec<String>) = (
        xs.iter().map(|&v| fmt(v)).collect(),
        ys.iter().map(|&v| fmt(v)).collect(),
    );
    render!(dir, "phase_diagram", (900, 640), out, |area| {
        let (main, bar) = area.split_horizontally(area.dim_in_pixel().0 - 110);
        let mut chart = ChartBuilder::on(&main)
            .caption(
                format!("Grokking epoch (first test accuracy >= 99%) over {x} and {y}"),
                font(20),
            )
            .margin(14)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xs.len() as f64, 0f64..ys.len() as f64)
            .map_err(pe)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x)
            .y_desc(y)
            .axis_desc_style(font(15))
            .label_style(font(13))
            .x_labels(xs.len() * 2 + 1)
            .y_labels(ys.len() * 2 + 1)
            .x_label_formatter(&|v| {
                let i = (v - 0.5).round();
                if (v - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < xs_l.len() {
                    xs_l[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| {
                let i = (v - 0.5).round();
                if (v - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < ys_l.len() {
                    ys_l[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(pe)?;
        for xi in 0..xs.len() {
            for yi in 0..ys.len() {
                let (g, n) = cell(xi, yi);
                let (fill, label) = match g {
                    Some(e) => (colormap(e / hi), format!("{e:.0}")),
                    None if n == 0 => (RGBColor(255, 255, 255), String::new()),
                    None => (RGBColor(200, 200, 200), "never".to_string()),
                };
                let (x0, y0) = (xi as f64, yi as f64);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, y0), (x0 + 1.0, y0 + 1.0)],
                        fill.filled(),
                    )))
                    .map_err(pe)?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (x0 + 0.38, y0 + 0.55),
                        font(14),
                    )))
                    .map_err(pe)?;
            }
        }
        colorbar(&bar, 0.0, hi, "grokking epoch")
    });
    Ok(out)
}
