//! What the test programs (`src/bin`) share: their flags (`--name value`, every one required)
//! and their `main` (logging, a current-thread runtime, the exit code).

use std::collections::HashMap;
#[cfg(feature = "logging")]
use std::{error::Error, future::Future, process::ExitCode};

/// `--name value` pairs from the command line: each of `names` exactly, nothing else.
///
/// # Errors
///
/// An unknown flag, one without its value, or a missing one: the message says which, then
/// `usage`.
pub fn flags(
    args: impl IntoIterator<Item = String>,
    names: &[&'static str],
    usage: &str,
) -> Result<HashMap<&'static str, String>, String> {
    let mut got = HashMap::new();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let Some(name) = names.iter().find(|n| flag.strip_prefix("--") == Some(**n)) else {
            return Err(format!("unknown argument {flag:?}; usage: {usage}"));
        };
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; usage: {usage}"))?;
        got.insert(*name, value);
    }
    match names.iter().find(|n| !got.contains_key(**n)) {
        Some(missing) => Err(format!("--{missing} is missing; usage: {usage}")),
        None => Ok(got),
    }
}

/// A test program's `main`: journald-or-stderr logging, its flags (see [`flags`]; exit 2 on
/// bad ones), then `run` on a current-thread runtime (exit 1 on its error, logged).
#[cfg(feature = "logging")]
pub fn main<F, Fut>(name: &str, names: &[&'static str], usage: &str, run: F) -> ExitCode
where
    F: FnOnce(HashMap<&'static str, String>) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn Error>>>,
{
    if let Err(e) = handover::logging::init() {
        eprintln!("{name}: {e}");
    }
    let flags = match flags(std::env::args().skip(1), names, usage) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flags;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_take_each_name_once_and_refuse_the_rest() {
        let names = ["pid-file", "addr"];
        let ok = flags(args(&["--addr", "a", "--pid-file", "p"]), &names, "u").unwrap();
        assert_eq!((ok["addr"].as_str(), ok["pid-file"].as_str()), ("a", "p"));
        for (bad, says) in [
            (&["--addr", "a"][..], "--pid-file is missing; usage: u"),
            (&["--addr"][..], "--addr needs a value; usage: u"),
            (
                &["--port", "1"][..],
                "unknown argument \"--port\"; usage: u",
            ),
            (&["addr", "a"][..], "unknown argument \"addr\"; usage: u"),
        ] {
            assert_eq!(flags(args(bad), &names, "u").unwrap_err(), says);
        }
    }
}
