//! Client-side CURVE: the broker's public key and the client's own key pair, applied to a
//! socket before it connects. Key files are read as [`shared::curve`] describes; the tools'
//! flags for them are `tools::curve::CurveArgs`.

pub use shared::curve::{decode_key, encode_key, read_key_file, Key, KeyError, SecretKey};

/// How a client socket authenticates.
#[derive(Clone, Debug, Default)]
pub enum Security {
    /// Plain ZMTP (the NULL mechanism).
    #[default]
    None,
    /// CURVE with the broker's public key and the client's key pair.
    Curve {
        /// The broker's public key.
        server: Key,
        /// This client's public key (the broker's allow file lists it).
        public: Key,
        /// This client's secret key.
        secret: SecretKey,
    },
}

impl Security {
    /// Configures `socket` before it connects.
    pub fn apply(&self, socket: &zmq::Socket) -> Result<(), crate::retry::Error> {
        let err = |what| move |e| crate::retry::Error::Zmq(what, e);
        if let Security::Curve {
            server,
            public,
            secret,
        } = self
        {
            socket.set_curve_serverkey(server).map_err(err("curve"))?;
            socket.set_curve_publickey(public).map_err(err("curve"))?;
            socket
                .set_curve_secretkey(&secret.0)
                .map_err(err("curve"))?;
        }
        Ok(())
    }
}
