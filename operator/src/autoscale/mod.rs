//! Queue-depth autoscaling: the pure decision function ([`decide`]), its pure helpers ([`plan`],
//! and [`demand`] for what counts as demand) and the loop around them ([`scaler`]).

pub mod decide;
pub mod demand;
pub mod plan;
pub mod scaler;
