//! Queue-depth autoscaling: the pure decision function ([`decide`]), its pure helpers ([`plan`])
//! and the loop around them ([`scaler`]).

pub mod decide;
pub mod plan;
pub mod scaler;
