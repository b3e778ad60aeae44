//! A raw ZMTP 3.0 peer over plain TCP, for attacks no well-behaved libzmq client would make:
//! frames left unfinished, messages of thousands of frames, a client that never reads. It
//! streams from a small buffer, so the test process does not hold what it sends.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::socket::{
    connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};

/// A connected, handshaken DEALER speaking raw ZMTP.
pub struct RawPeer {
    pub stream: TcpStream,
}

impl RawPeer {
    /// Connects to 127.0.0.1:`port` and completes the NULL handshake as a DEALER. With
    /// `rcvbuf`, the socket's receive buffer is that small (a client that will not read).
    pub fn connect(port: u16, rcvbuf: Option<usize>) -> io::Result<RawPeer> {
        let fd: OwnedFd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        if let Some(bytes) = rcvbuf {
            setsockopt(&fd, sockopt::RcvBuf, &bytes)?;
        }
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
        let mut stream = TcpStream::from(fd);
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut greeting = [0u8; 64];
        greeting[0] = 0xff;
        greeting[9] = 0x7f;
        greeting[10] = 3;
        greeting[12..16].copy_from_slice(b"NULL");
        stream.write_all(&greeting)?;
        let mut ready = vec![5u8];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&6u32.to_be_bytes());
        ready.extend_from_slice(b"DEALER");
        stream.write_all(&[0x04, ready.len() as u8])?;
        stream.write_all(&ready)?;
        // The broker's greeting and READY: a peer may send messages only after them.
        let mut theirs = [0u8; 64];
        stream.read_exact(&mut theirs)?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head)?;
        let mut command = vec![0u8; usize::from(head[1])];
        stream.read_exact(&mut command)?;
        Ok(RawPeer { stream })
    }

    /// Writes a frame header announcing `size` bytes (with MORE if `more`).
    pub fn header(&mut self, size: u64, more: bool) -> io::Result<()> {
        let flags = u8::from(more) | if size > 255 { 2 } else { 0 };
        if size > 255 {
            self.stream.write_all(&[flags])?;
            self.stream.write_all(&size.to_be_bytes())
        } else {
            self.stream.write_all(&[flags, size as u8])
        }
    }

    /// Writes `size` bytes of frame content from a reused buffer.
    pub fn fill(&mut self, mut size: u64) -> io::Result<()> {
        static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        while size > 0 {
            let n = size.min(CHUNK.len() as u64) as usize;
            self.stream.write_all(&CHUNK[..n])?;
            size -= n as u64;
        }
        Ok(())
    }

    /// Writes a whole frame.
    pub fn frame(&mut self, data: &[u8], more: bool) -> io::Result<()> {
        self.header(data.len() as u64, more)?;
        self.stream.write_all(data)
    }

    /// Writes `count` empty frames with MORE set (the costliest input per byte).
    pub fn empty_frames(&mut self, count: usize) -> io::Result<()> {
        let block = [1u8, 0].repeat(32 * 1024);
        let mut left = count;
        while left > 0 {
            let n = left.min(32 * 1024);
            self.stream.write_all(&block[..2 * n])?;
            left -= n;
        }
        Ok(())
    }

    /// Reads one message (skipping commands such as PING).
    pub fn recv_message(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut frames = Vec::new();
        loop {
            let mut flags = [0u8; 1];
            self.stream.read_exact(&mut flags)?;
            let size = if flags[0] & 2 != 0 {
                let mut size = [0u8; 8];
                self.stream.read_exact(&mut size)?;
                u64::from_be_bytes(size)
            } else {
                let mut size = [0u8; 1];
                self.stream.read_exact(&mut size)?;
                u64::from(size[0])
            };
            let mut data = vec![0u8; size as usize];
            self.stream.read_exact(&mut data)?;
            if flags[0] & 4 != 0 {
                continue;
            }
            frames.push(data);
            if flags[0] & 1 == 0 {
                return Ok(frames);
            }
        }
    }
}
