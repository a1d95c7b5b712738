package l4

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls of the event loops' hot path, as RawSyscall: none of
// them can wait (the sockets are non-blocking, and close never lingers:
// SO_LINGER is only ever set to reset at once), so the scheduler need not
// know about them. Through x/sys/unix each one enters and leaves the
// scheduler's syscall state, and one that runs long, as a loopback connect
// or close does when the kernel processes the handshake inline, lets
// sysmon take the loop's P and wake another thread for it: measured as a
// futex and two nanosleep calls per new connection in redis -k 0, with
// sysmon kept at its fastest polling.

func rawClose(fd int) {
	unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

func rawSocket(domain, typ int) (int, error) {
	fd, _, errno := unix.RawSyscall(unix.SYS_SOCKET, uintptr(domain), uintptr(typ), 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

func rawSetsockoptInt(fd, level, opt, value int) error {
	v := int32(value)
	_, _, errno := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func rawGetsockoptInt(fd, level, opt int) (int, error) {
	var v int32
	size := uint32(4)
	_, _, errno := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return 0, errno
	}
	return int(v), nil
}

// rawResetOnClose sets SO_LINGER on with a zero timeout: close(2) then
// sends a reset instead of a FIN and frees the socket at once.
func rawResetOnClose(fd int) {
	l := unix.Linger{Onoff: 1, Linger: 0}
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
}

// rawYield is sched_yield(2): it gives the core to whatever else is
// runnable on it and returns at once when nothing is.
func rawYield() {
	unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
}

// rawPollNow returns the events among events that fd has ready now:
// ppoll(2) with a zero timeout, which never waits.
func rawPollNow(fd int, events int16) int16 {
	pfd := unix.PollFd{Fd: int32(fd), Events: events}
	var now unix.Timespec
	n, _, errno := unix.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&now)), 0, 0, 0)
	if errno != 0 || n == 0 {
		return 0
	}
	return pfd.Revents
}

func rawShutdownWrite(fd int) {
	unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0)
}

func rawEpollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// rawConnect starts a connect of the non-blocking socket fd to addr: nil
// or EINPROGRESS mean it is under way.
func rawConnect(fd int, addr netip.AddrPort) error {
	var sa unix.RawSockaddrAny
	var size uintptr
	port := addr.Port()
	if addr.Addr().Is4() {
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa))
		in.Family = unix.AF_INET
		in.Addr = addr.Addr().As4()
		*(*[2]byte)(unsafe.Pointer(&in.Port)) = [2]byte{byte(port >> 8), byte(port)} // network byte order
		size = unix.SizeofSockaddrInet4
	} else {
		in := (*unix.RawSockaddrInet6)(unsafe.Pointer(&sa))
		in.Family = unix.AF_INET6
		in.Addr = addr.Addr().As16()
		*(*[2]byte)(unsafe.Pointer(&in.Port)) = [2]byte{byte(port >> 8), byte(port)}
		size = unix.SizeofSockaddrInet6
	}
	_, _, errno := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), size)
	if errno != 0 {
		return errno
	}
	return nil
}
