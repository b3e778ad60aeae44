//! The few operating-system and libzmq calls that neither std, nix nor the zmq crate offers
//! safely, kept in one place so the rest of the crate stays `unsafe`-free: duplicating
//! libzmq's connection sockets, reading `TCP_INFO` (the byte counters the memory bounds are
//! built on) and the kernel's queue lengths, corking a connection, tuning glibc's allocator,
//! and deriving a CURVE public key.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Duplicates the socket libzmq reported as `raw` (a connection's fd from the socket
/// monitor), so the broker can measure and shut down that connection without racing libzmq's
/// `close`: the duplicate keeps the same socket open until the broker drops it, whatever
/// libzmq does with its own descriptor number meanwhile.
pub fn dup_socket(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `borrow_raw` asks that `raw` stay open while borrowed. The borrow lives only
    // for the `fcntl(F_DUPFD_CLOEXEC)` inside `try_clone_to_owned`. If libzmq closed `raw`
    // before that call, it fails with EBADF; if the number was reused meanwhile, the duplicate
    // names some other file, which the caller rejects by checking the socket's local address.
    // No memory is accessed through the descriptor either way.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    borrowed.try_clone_to_owned()
}

/// The counters of one TCP connection that the broker's byte accounting uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Bytes received from the peer (`tcpi_bytes_received`), whoever has read them since.
    pub received: u64,
    /// Bytes the peer acknowledged (`tcpi_bytes_acked`): they left this host's memory.
    pub acked: u64,
}

/// The kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to the fields read here.
/// The kernel copies `min(optlen, its size)` bytes, so an older kernel fills less and a newer
/// one more; the length it reports says which fields are valid.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    app_limited: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// Reads the connection's byte counters (Linux 4.1 and later).
pub fn tcp_counters(fd: BorrowedFd<'_>) -> io::Result<TcpCounters> {
    let mut info = TcpInfo::default();
    let mut len = std::mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a plain repr(C) struct of integers, valid for any bytes, and `len` is
    // its size, so the kernel writes at most that many bytes into it.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<TcpInfo>() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO without byte counters (Linux older than 4.1)",
        ));
    }
    Ok(TcpCounters {
        received: info.bytes_received,
        acked: info.bytes_acked,
    })
}

/// Makes glibc return freed large buffers to the OS at once. By default glibc raises its
/// mmap threshold after a large block is freed (up to 32 MiB), so later 1-2 MiB frames come
/// from the heap and stay resident after use: a burst of large requests would then hold its
/// peak memory for good. A fixed threshold also disables that adjustment. Fewer arenas bound
/// the memory each thread's free lists can keep.
pub fn tune_malloc(mmap_threshold: usize, arenas: usize) {
    // SAFETY: mallopt only sets allocator parameters; any value is accepted or refused.
    unsafe {
        libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            mmap_threshold.min(i32::MAX as usize) as i32,
        );
        libc::mallopt(libc::M_ARENA_MAX, arenas.min(i32::MAX as usize) as i32);
    }
}

/// Aborts a TCP connection at once: `connect(AF_UNSPEC)` makes Linux reset it (RST to the
/// peer, both queues purged), so libzmq's next read on its own descriptor fails and it drops
/// the connection with everything it held. A `shutdown` is not enough: Linux keeps queueing
/// what a peer still sends after SHUT_RD, and libzmq keeps reading it.
pub fn abort_connection(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC is a valid argument of that size; the
    // kernel reads only `len` bytes of it.
    let rc = unsafe {
        let mut addr: libc::sockaddr = std::mem::zeroed();
        addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            fd.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Holds (`on`) or releases what is written to a TCP socket: while corked, Linux sends only
/// full segments, so a reply libzmq writes waits in the kernel; a `shutdown(SHUT_WR)` then
/// sends it with the FIN in the same segment (the kernel pushes corked data at a FIN), and
/// the peer reads the reply and the end of the stream together.
pub fn set_cork(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let value: libc::c_int = on.into();
    // SAFETY: `value` is a c_int that lives across the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes in a socket's kernel queues: (written and not yet acknowledged by the peer, sent or
/// not: `SIOCOUTQ`; received and not yet read by libzmq: `SIOCINQ`).
pub fn queued_bytes(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let mut out: libc::c_int = 0;
    let mut inq: libc::c_int = 0;
    // SAFETY: both requests write one c_int through the pointer given, which is valid for it.
    let rc = unsafe {
        let rc = libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut out as *mut libc::c_int);
        if rc != 0 {
            rc
        } else {
            libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut inq as *mut libc::c_int)
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((out.max(0) as u64, inq.max(0) as u64))
}

/// Drops the data waiting in a TCP socket's receive queue without reading it (`MSG_TRUNC`,
/// which the kernel honours for TCP by discarding instead of copying). Returns the bytes
/// dropped.
pub fn discard_input(fd: BorrowedFd<'_>) -> usize {
    let mut dropped = 0;
    loop {
        // SAFETY: with MSG_TRUNC on a TCP socket the kernel discards up to `len` bytes and
        // writes nothing to the buffer, so a null pointer is never dereferenced.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 20,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return dropped;
        }
        dropped += n as usize;
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1: no limit). `fds` holds
/// (descriptor, readable) pairs; the flags are set on return. The descriptors are libzmq's
/// notification fds and the broker's own, polled as raw numbers: `zmq_poll` would also query
/// every ZeroMQ socket's events before and after waiting, several syscalls each time.
pub fn poll_readable(fds: &mut [(RawFd, bool)], timeout_ms: i32) -> io::Result<()> {
    const MAX: usize = 8;
    // A negative descriptor is skipped by poll.
    let mut pollfds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; MAX];
    let n = fds.len().min(MAX);
    for (p, &(fd, _)) in pollfds.iter_mut().zip(fds.iter()) {
        p.fd = fd;
    }
    let pollfds = &mut pollfds[..n];
    loop {
        // SAFETY: `pollfds` is a valid array of `len` pollfd structs; poll on a descriptor
        // that is not open only reports POLLNVAL for it.
        let rc = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if rc >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    for (slot, p) in fds.iter_mut().zip(pollfds.iter()) {
        slot.1 = p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    }
    Ok(())
}

/// Puts the calling thread under SCHED_BATCH: a batch thread that wakes up does not preempt
/// the thread running on its CPU. When the coordinator and the workers share a busy CPU with
/// libzmq's I/O thread, the I/O thread then finishes the burst it is reading before they run,
/// and each of them takes a batch per wake-up instead of a message. On an idle CPU a woken
/// thread runs at once, as before. Unprivileged; failure only loses the batching.
pub fn batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Returns the allocator's free memory to the OS now. After a burst (a flood of tiny frames
/// freed at once), glibc keeps the freed chunks in its arenas and the resident size stays up;
/// trimming them keeps the memory guard from seeing a pressure that is gone.
pub fn trim_malloc() {
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

extern "C" {
    // libzmq (4.2+): derives a CURVE public key from a secret one, both Z85 with a NUL.
    fn zmq_curve_public(z85_public: *mut libc::c_char, z85_secret: *const libc::c_char) -> i32;
}

/// The public key of a CURVE secret key, so the broker can log the key clients need.
pub fn curve_public(secret: &shared::curve::Key) -> Option<shared::curve::Key> {
    let secret = std::ffi::CString::new(shared::curve::encode_key(secret)).ok()?;
    let mut public = [0 as libc::c_char; 41];
    // SAFETY: both buffers are 41 bytes (40 Z85 characters and a NUL) as libzmq requires;
    // `secret` is NUL-terminated and outlives the call, which only reads it.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr(), secret.as_ptr()) };
    if rc != 0 {
        return None;
    }
    let text: Vec<u8> = public[..40].iter().map(|&c| c as u8).collect();
    shared::curve::decode_key(std::str::from_utf8(&text).ok()?, "public").ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn counters_follow_the_bytes_and_a_duplicate_sees_the_same_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(&[7u8; 1000]).expect("write");
        let mut buf = [0u8; 1000];
        server.read_exact(&mut buf).expect("read");
        server.write_all(&[1u8; 300]).expect("write back");
        client.read_exact(&mut buf[..300]).expect("read back");
        let dup = dup_socket(server.as_raw_fd()).expect("dup");
        let mut counters = tcp_counters(dup.as_fd()).expect("tcp_info");
        // The acknowledgement of the last write may still be on its way.
        for _ in 0..100 {
            if counters.acked == 300 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            counters = tcp_counters(dup.as_fd()).expect("tcp_info");
        }
        assert_eq!(
            counters,
            TcpCounters {
                received: 1000,
                acked: 300
            }
        );
        // Waiting input can be dropped unread.
        client.write_all(&[9u8; 5000]).expect("write");
        let mut dropped = 0;
        for _ in 0..100 {
            dropped += discard_input(dup.as_fd());
            if dropped >= 5000 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(dropped, 5000);
        // Aborting through the duplicate resets the connection for its other descriptor and
        // for the peer, even while the peer keeps sending.
        client.write_all(&[9u8; 1000]).expect("write");
        abort_connection(dup.as_fd()).expect("abort");
        assert!(
            matches!(server.read(&mut buf), Ok(0) | Err(_)),
            "the server side is done"
        );
        let mut failed = false;
        for _ in 0..100 {
            if client.write_all(&[1u8; 1000]).is_err() {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(failed, "the peer's writes fail after the reset");
    }
}
