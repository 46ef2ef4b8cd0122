//! Descriptors: registering them with tokio's reactor, and taking ownership of the ones the
//! kernel hands over (`accept4`, `SCM_RIGHTS`).

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockFlag, accept4, recvmsg};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

mod sealed {
    pub trait Sealed {}
}

/// A value whose descriptor stays open, and is the same descriptor, for as long as the value
/// lives: what tokio's [`AsyncFd`] requires of what it polls. Sealed: only the types below.
pub trait StableFd: AsRawFd + sealed::Sealed {}

/// Owns its descriptor, closes it only on drop, and `as_raw_fd` always returns it.
impl sealed::Sealed for OwnedFd {}
impl StableFd for OwnedFd {}

/// aya's ring buffer owns its map's descriptor (through its `MapData`) and never replaces it.
impl sealed::Sealed for aya::maps::RingBuf<aya::maps::MapData> {}
impl StableFd for aya::maps::RingBuf<aya::maps::MapData> {}

/// aya-log's logger owns its ring buffer's descriptor for its lifetime and never replaces it.
impl sealed::Sealed for aya_log::EbpfLogger<&'static dyn log::Log> {}
impl StableFd for aya_log::EbpfLogger<&'static dyn log::Log> {}

/// Registers `inner` with the current tokio runtime's reactor, for `interest`.
pub fn async_fd<T: StableFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T: StableFd`, sealed to the types above, each of which keeps its descriptor
    // open and the same for its lifetime, and so for the AsyncFd's that owns it.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(io::Error::from)
}

/// Accepts one connection on a listening socket, non-blocking and close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The kernel's own limit on descriptors in one message (`SCM_MAX_FD`): the control buffer
/// holds that many, so no descriptor a caller sends is cut off unseen (and left open in this
/// process): each one arrives, is owned, and is closed when its owner drops it.
const SCM_MAX_FD: usize = 253;

/// What one `recvmsg` got.
pub struct Received {
    /// Bytes of the message read into the buffer (MSG_TRUNC: more were cut off when this is
    /// the buffer's length).
    pub bytes: usize,
    /// The control data could not be read whole (only if the kernel raised `SCM_MAX_FD`).
    pub control_cut: bool,
    /// The descriptors passed with `SCM_RIGHTS`, owned (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

/// One `recvmsg` on a Unix socket into `buf`, with every `SCM_RIGHTS` descriptor taken.
pub fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    // With the buffer above the control data is never cut, so this only fails if the kernel
    // changes its limit.
    let control_cut = msg.cmsgs().map_or(true, |cmsgs| {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this process for us
                    // alone.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        false
    });
    Ok(Received {
        bytes: msg.bytes,
        control_cut,
        fds,
    })
}
