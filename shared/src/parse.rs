//! Parsers for command-line values that the broker and its tools share, so a flag accepts the
//! same forms everywhere and refuses out-of-range values with the same words. With the `cli`
//! feature, [`Trimmed`] makes every flag ignore the white space around its value the same way
//! (a variable written `"5\n"` or `" sleep"` in a manifest works like `5` or `sleep`).

use std::time::Duration;

/// Parses a whole number from `MIN` to `MAX` (for clap's `value_parser = count::<1, 10>`).
pub fn count<const MIN: usize, const MAX: usize>(text: &str) -> Result<usize, String> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (MIN..=MAX).contains(n))
        .ok_or_else(|| format!("expected a number from {MIN} to {MAX}"))
}

/// Parses `500ms`, `5s`, `1m` or a bare `0`.
pub fn duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (expected a duration such as 500ms, 5s or 1m)"))
}

/// Parses a duration no longer than `max` (and, with `positive`, more than zero): longer
/// timers could not be added to a clock without overflowing.
pub fn bounded_duration(text: &str, max: Duration, positive: bool) -> Result<Duration, String> {
    let d = duration(text)?;
    if d > max {
        return Err(format!(
            "at most {} is accepted",
            humantime::format_duration(max)
        ));
    }
    if positive && d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// A clap value parser that ignores white space (any Unicode white space: spaces, tabs,
/// newlines, no-break spaces) around the value before `P` parses it, so every flag and
/// variable treats it alike. Possible values (for `--help`) are `P`'s.
#[cfg(feature = "cli")]
#[derive(Clone, Debug)]
pub struct Trimmed<P>(pub P);

#[cfg(feature = "cli")]
impl<P: clap::builder::TypedValueParser> clap::builder::TypedValueParser for Trimmed<P> {
    type Value = P::Value;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let trimmed = value
            .to_str()
            .map_or(value, |v| std::ffi::OsStr::new(v.trim()));
        self.0.parse_ref(cmd, arg, trimmed)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        self.0.possible_values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_durations_are_bounded() {
        assert_eq!(count::<1, 10>("10"), Ok(10));
        assert!(count::<1, 10>("0").is_err());
        assert!(count::<1, 10>("18446744073709551616").is_err());
        assert!(count::<1, 10>("ten").is_err());
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("1m"), Ok(Duration::from_secs(60)));
        let hour = Duration::from_secs(3600);
        assert!(bounded_duration("300000000000y", hour, false).is_err());
        assert!(bounded_duration("0s", hour, true).is_err());
        assert_eq!(bounded_duration("1h", hour, true), Ok(hour));
    }
}
