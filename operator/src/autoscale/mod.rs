//! Queue-depth autoscaling: a pure decision function (`decide`) and, later, the loop around it.

pub mod decide;
