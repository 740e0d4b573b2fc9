//! kvpool-sim: being built (issue 5).
fn main() {}
