//! The CURVE flags `broker probe` and `broker bench` share, turned into the client library's
//! [`Security`].

use std::process::ExitCode;

use clap::builder::{PathBufValueParser, StringValueParser};
use clap::Args;
use client::Security;
use shared::curve::{decode_key, read_key_file, read_key_pair, KeyError};
use shared::parse::Trimmed;

/// CURVE flags that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CurveArgsError {
    /// A key given on the command line, or flags missing (the message names them).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A key file that cannot be used, with the flag that named it.
    #[error("{0} {1}")]
    File(&'static str, KeyError),
}

/// CURVE flags shared by `broker probe` and `broker bench`.
#[derive(Clone, Debug, Default, Args)]
pub struct CurveArgs {
    /// The broker's CURVE public key (Z85); with --curve-key-file, connect with CURVE.
    #[arg(
        long,
        env = "BROKER_CURVE_SERVER_KEY",
        conflicts_with = "curve_server_key_file",
        value_parser = Trimmed(StringValueParser::new())
    )]
    pub curve_server_key: Option<String>,
    /// A file holding the broker's public key (a bare Z85 key or a `public-key = ` line),
    /// instead of --curve-server-key.
    #[arg(long, env = "BROKER_CURVE_SERVER_KEY_FILE", value_parser = Trimmed(PathBufValueParser::new()))]
    pub curve_server_key_file: Option<std::path::PathBuf>,
    /// This client's key pair, as `broker keygen` writes it.
    #[arg(long, env = "BROKER_CURVE_KEY_FILE", value_parser = Trimmed(PathBufValueParser::new()))]
    pub curve_key_file: Option<std::path::PathBuf>,
}

impl CurveArgs {
    /// The security these flags ask for, or exit code 2 after one line on stderr: settings
    /// that cannot work are a usage error, never a failed run (a kubelet restarting the pod
    /// would not fix them).
    pub fn security_or_usage_error(&self) -> Result<Security, ExitCode> {
        self.security().map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(2)
        })
    }

    /// The security these flags ask for.
    pub fn security(&self) -> Result<Security, CurveArgsError> {
        let server = match (&self.curve_server_key, &self.curve_server_key_file) {
            (Some(key), _) => Some(decode_key(key, "--curve-server-key")?),
            (None, Some(file)) => Some(
                read_key_file(file, "public")
                    .map_err(|e| CurveArgsError::File("--curve-server-key-file", e))?,
            ),
            (None, None) => None,
        };
        match (server, &self.curve_key_file) {
            (None, None) => Ok(Security::None),
            (Some(server), Some(file)) => {
                let (public, secret) =
                    read_key_pair(file).map_err(|e| CurveArgsError::File("--curve-key-file", e))?;
                Ok(Security::Curve {
                    server,
                    public,
                    secret,
                })
            }
            _ => Err(KeyError::Incomplete.into()),
        }
    }
}
