//! Scenarios on a shared fixture: a lab or server is expensive, so one test function starts it
//! and runs a list of scenarios on it, each its own function named as a sentence. Each is
//! announced, timed, and a failure names it before the panic goes on (the scenarios after a
//! failed one do not run: they may build on its state).

use std::{panic::AssertUnwindSafe, time::Instant};

/// Runs `f` as the scenario `name` (a function name; its underscores read as spaces).
/// For a developer's run, `KEELSON_SCENARIOS=word,word` runs only the scenarios whose name
/// holds one of the words (CI sets nothing and runs them all).
pub fn scenario(name: &str, f: impl FnOnce()) {
    let sentence = name.replace('_', " ");
    if let Ok(only) = std::env::var("KEELSON_SCENARIOS")
        && !only.split(',').any(|w| !w.is_empty() && name.contains(w))
    {
        eprintln!("--- scenario not picked: {sentence}");
        return;
    }
    eprintln!("--- scenario: {sentence}");
    let t0 = Instant::now();
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
        eprintln!("--- scenario FAILED: {sentence}");
        std::panic::resume_unwind(panic);
    }
    eprintln!(
        "--- scenario ok: {sentence} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
}

/// `scenarios!(&fixture; first_scenario, second_scenario, …)`: each function is called with
/// the fixture, in order, through [`scenario`].
#[macro_export]
macro_rules! scenarios {
    ($fixture:expr; $($s:ident),+ $(,)?) => {{
        let fixture = $fixture;
        $( $crate::common::scenario::scenario(stringify!($s), || $s(fixture)); )+
    }};
}
