//go:build linux

// Package mmsg moves batches of UDP datagrams with recvmmsg(2) and
// sendmmsg(2): one system call for up to len(Batch.Bufs) datagrams.
//
// x/sys/unix has no wrapper for these calls, and golang.org/x/net/ipv4's
// ReadBatch allocates a net.Addr per datagram; this package calls them
// directly on a descriptor from syscall.RawConn and allocates nothing per
// call. The calls go through RawSyscall6: with MSG_DONTWAIT they never
// block, so the scheduler need not know about them, and entering them as
// blocking system calls (Syscall6) let Go's sysmon hand the goroutine's P
// to another thread whenever one took over 20 µs, which on the
// benchmark's VM was often: the futex wake-ups cost l4lb about 12% more
// CPU per datagram.
//
//	b := mmsg.NewBatch(32, 2048, false)
//	rc.Read(func(fd uintptr) bool {
//		n, err = b.Recv(int(fd))
//		return err != unix.EAGAIN // false: wait for the socket to be readable
//	})
//	for i := range n { handle(b.Bufs[i][:b.Lens[i]], b.Addr(i)) }
package mmsg

import (
	"net"
	"net/netip"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr of <sys/socket.h>: a msghdr and the length the
// kernel moved. Go pads it to the C layout on every architecture.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// Batch is a reusable set of datagram slots: a buffer, a length and an
// address each. Not safe for concurrent use.
type Batch struct {
	// Bufs are the slots' buffers. Recv fills them; before Send, point
	// Bufs[i] at the bytes to send (any slice; SetLen is not needed).
	Bufs [][]byte
	// Lens are the datagram lengths Recv read.
	Lens []int

	hdrs  []mmsghdr
	iovs  []unix.Iovec
	addrs []unix.RawSockaddrInet6 // big enough for either family
	inet6 bool                    // the socket is AF_INET6: addresses are sockaddr_in6
	own   [][]byte                // the buffers NewBatch made, to reset Bufs
	// zoneIndex and zone are the last scope id Addr turned into a zone,
	// so that a link-local peer's datagrams allocate nothing.
	zoneIndex uint32
	zone      string
}

// NewBatch returns a batch of n slots of bufSize bytes each. inet6 says
// whether the socket it will be used on is AF_INET6 (then IPv4 peers are
// IPv4-mapped IPv6 addresses, as Go's net package reports them too).
func NewBatch(n, bufSize int, inet6 bool) *Batch {
	b := &Batch{
		Bufs:  make([][]byte, n),
		Lens:  make([]int, n),
		hdrs:  make([]mmsghdr, n),
		iovs:  make([]unix.Iovec, n),
		addrs: make([]unix.RawSockaddrInet6, n),
		inet6: inet6,
		own:   make([][]byte, n),
	}
	mem := make([]byte, n*bufSize)
	for i := range n {
		b.own[i] = mem[i*bufSize : (i+1)*bufSize : (i+1)*bufSize]
		b.Bufs[i] = b.own[i]
	}
	return b
}

// Len is the number of slots.
func (b *Batch) Len() int { return len(b.hdrs) }

// ResetBufs points every slot back at its own buffer, after Send used
// other slices.
func (b *Batch) ResetBufs() { copy(b.Bufs, b.own) }

// Recv reads up to Len datagrams waiting on the non-blocking socket fd
// without waiting, and returns how many it read; Bufs[i][:Lens[i]] and
// Addr(i) are the i-th. It returns unix.EAGAIN when none is waiting.
func (b *Batch) Recv(fd int) (int, error) {
	for i := range b.hdrs {
		buf := b.Bufs[i]
		b.iovs[i].Base = unsafe.SliceData(buf)
		b.iovs[i].SetLen(len(buf))
		h := &b.hdrs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&b.addrs[i]))
		h.Namelen = uint32(unsafe.Sizeof(b.addrs[i]))
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		h.Control = nil
		h.SetControllen(0)
		h.Flags = 0
	}
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[0])),
			uintptr(len(b.hdrs)), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		n := int(r)
		for i := range n {
			b.Lens[i] = int(b.hdrs[i].n)
		}
		return n, nil
	}
}

// Addr is the source address of the i-th datagram Recv read.
func (b *Batch) Addr(i int) netip.AddrPort {
	sa := &b.addrs[i]
	if sa.Family == unix.AF_INET {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), ntohs(sa4.Port))
	}
	ip := netip.AddrFrom16(sa.Addr)
	if sa.Scope_id != 0 {
		// Link-local peers: the zone is the interface index, as a number
		// (netip takes any zone, and SetAddr reads it back). An interface
		// name would cost a netlink dump per datagram: net does not cache
		// them.
		if sa.Scope_id != b.zoneIndex {
			b.zoneIndex, b.zone = sa.Scope_id, strconv.FormatUint(uint64(sa.Scope_id), 10)
		}
		ip = ip.WithZone(b.zone)
	}
	return netip.AddrPortFrom(ip, ntohs(sa.Port))
}

// SetAddr sets the destination of slot i for Send. On an AF_INET socket
// the address must be IPv4 (or IPv4-mapped); on AF_INET6 IPv4 addresses
// are mapped.
func (b *Batch) SetAddr(i int, ap netip.AddrPort) {
	sa := &b.addrs[i]
	ip := ap.Addr()
	if !b.inet6 {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Port: htons(ap.Port()), Addr: ip.Unmap().As4()}
		return
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: htons(ap.Port()), Addr: ip.As16()}
	if z := ip.Zone(); z != "" {
		if index, err := strconv.ParseUint(z, 10, 32); err == nil {
			sa.Scope_id = uint32(index) // as Addr writes it
		} else if ifi, err := net.InterfaceByName(z); err == nil {
			sa.Scope_id = uint32(ifi.Index)
		}
	}
}

// Send sends slots [from, to) on the non-blocking socket fd, slot i being
// Bufs[i] to the address SetAddr gave it (or to the connected peer when
// noAddr is true). It returns how many the kernel took; when that is fewer
// than to-from, err is the error of the first datagram not sent:
// unix.EAGAIN when the socket buffer is full (wait for it to be writable),
// another error for that one datagram (skip it and send the rest).
func (b *Batch) Send(fd, from, to int, noAddr bool) (int, error) {
	for i := from; i < to; i++ {
		buf := b.Bufs[i]
		b.iovs[i].Base = unsafe.SliceData(buf)
		b.iovs[i].SetLen(len(buf))
		h := &b.hdrs[i].hdr
		if noAddr {
			h.Name, h.Namelen = nil, 0
		} else {
			h.Name = (*byte)(unsafe.Pointer(&b.addrs[i]))
			h.Namelen = unix.SizeofSockaddrInet4
			if b.inet6 {
				h.Namelen = unix.SizeofSockaddrInet6
			}
		}
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		h.Control = nil
		h.SetControllen(0)
		h.Flags = 0
	}
	sent := from
	for sent < to {
		r, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[sent])),
			uintptr(to-sent), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return sent - from, e
		}
		if r == 0 {
			return sent - from, unix.EAGAIN
		}
		sent += int(r)
	}
	return sent - from, nil
}

func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func htons(p uint16) uint16 {
	var r uint16
	b := (*[2]byte)(unsafe.Pointer(&r))
	b[0], b[1] = byte(p>>8), byte(p)
	return r
}
