//! A broker with your own handler: replies with each body frame upper-cased, and refuses
//! frames that are not UTF-8 with `ERR bad_request`.
//!
//! ```sh
//! cargo run --release --example uppercase -- --frontend tcp://127.0.0.1:5555 --admin 127.0.0.1:8000
//! ```
//! Every broker flag works here; `--handler` is ignored since this binary picks the handler.

use std::process::ExitCode;
use std::sync::Arc;

use broker::config::ServeCli;
use worker::{Frame, Handler, HandlerError};

/// One per worker thread: state here needs no lock.
struct Uppercase {
    served: u64,
}

impl Handler for Uppercase {
    fn handle(&mut self, request: Vec<Frame>) -> Result<Vec<Frame>, HandlerError> {
        self.served += 1;
        request
            .iter()
            .map(|frame| match std::str::from_utf8(frame) {
                Ok(text) => Ok(Frame::from(text.to_uppercase().as_str())),
                Err(_) => Err(HandlerError::bad_request("frames must be UTF-8 text")),
            })
            .collect()
    }
}

fn main() -> ExitCode {
    // The same flags, env vars, logging, signals and exit codes as the `broker` binary.
    let cli = match broker::parse_args::<ServeCli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    broker::serve(cli.serve, |_config| {
        Arc::new(|_worker| Box::new(Uppercase { served: 0 }) as Box<dyn Handler>)
    })
}
