//! Pure parts of the live demo (`cargo run -p celery-e2e --example demo`, `make demo`): turning the
//! WorkerPool and its worker Deployment into a once-per-second [`Sample`], printing the timeline,
//! spotting scale events, summarising a run and drawing the SVG plot. The example does the I/O.

mod plot;
mod timeline;

pub use plot::render_svg;
pub use timeline::{Sample, ScaleEvent, ScaleEvents, Summary, format_event, format_row, header, summarize};
