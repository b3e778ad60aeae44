//! Log set-up: fern to stdout, as text for people or JSON lines for log pipelines.

use std::time::SystemTime;

use log::LevelFilter;

/// How each log line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000Z INFO target: message`
    Text,
    /// `{"time":"...","level":"INFO","target":"...","message":"..."}`
    Json,
}

/// Installing the global logger failed (it was already set).
#[derive(Debug, thiserror::Error)]
#[error("cannot install the logger: {0}")]
pub struct Error(#[from] log::SetLoggerError);

/// Installs the global logger. Call once, before any thread starts.
pub fn init(level: LevelFilter, format: LogFormat) -> Result<(), Error> {
    let dispatch = fern::Dispatch::new().level(level);
    let dispatch = match format {
        LogFormat::Text => dispatch.format(|out, message, record| {
            out.finish(format_args!(
                "{} {:<5} {}: {}",
                humantime::format_rfc3339_millis(SystemTime::now()),
                record.level(),
                record.target(),
                message
            ))
        }),
        LogFormat::Json => dispatch.format(|out, message, record| {
            let line = serde_json::json!({
                "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": message.to_string(),
            });
            out.finish(format_args!("{line}"))
        }),
    };
    dispatch.chain(std::io::stdout()).apply()?;
    Ok(())
}
