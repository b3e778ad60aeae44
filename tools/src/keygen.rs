//! `broker keygen`: prints a new CURVE key pair in the format every key-file flag reads
//! (`public-key = "..."`, `secret-key = "..."`, Z85; see [`shared::curve`]).

use std::process::ExitCode;

/// Prints a new key pair on stdout; exit 1 when this libzmq cannot make one.
pub fn run() -> ExitCode {
    if zmq::has("curve") != Some(true) {
        eprintln!("error: this libzmq was built without CURVE (libsodium)");
        return ExitCode::FAILURE;
    }
    match zmq::CurveKeyPair::new() {
        Ok(pair) => {
            let z85 = |key: &[u8; 32]| zmq::z85_encode(key).unwrap_or_default();
            println!(
                "# CURVE key pair (Z85). The public key may be shared; keep the secret one secret."
            );
            println!("public-key = \"{}\"", z85(&pair.public_key));
            println!("secret-key = \"{}\"", z85(&pair.secret_key));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot generate a key pair: {e}");
            ExitCode::FAILURE
        }
    }
}
