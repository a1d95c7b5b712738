package l4

// The PROXY protocol, versions 1 (text) and 2 (binary), as specified in
// HAProxy's doc/proxy-protocol.txt: l4lb sends a header to backends first
// on each connection (and before each UDP datagram with v2), and reads one
// from trusted balancers in front of it.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

const (
	// proxyV1Max is the longest v1 header, CRLF included ("PROXY TCP6" with
	// two full IPv6 addresses and ports): the spec's 107 bytes.
	proxyV1Max = 107
	// proxyHeaderMax bounds a header l4lb reads: a v2 header may carry up to
	// 64 KiB of TLVs, but balancers send a few dozen bytes of them (AWS's
	// VPC endpoint id, a unique id); a client sending more is refused rather
	// than allowed to make l4lb buffer it.
	proxyHeaderMax   = 1024
	proxyV2HeaderLen = 16
)

// proxyV2Sig starts every v2 header.
var proxyV2Sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

var proxyV1Prefix = []byte("PROXY ")

var (
	// errProxyNeedMore: the bytes so far are a valid start of a header.
	errProxyNeedMore = errors.New("proxy header incomplete")
	// errProxyMalformed wraps every parse failure.
	errProxyMalformed = errors.New("malformed PROXY header")
)

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errProxyMalformed, fmt.Sprintf(format, args...))
}

// proxyHeader is what a parsed header says about the connection.
type proxyHeader struct {
	// local is set for v2 LOCAL and v1 UNKNOWN (and v2 UNSPEC): the
	// sender's own connection (a health check), whose socket addresses
	// stand.
	local    bool
	src, dst netip.AddrPort
}

// parseProxyHeader parses the header at the start of b. It returns the
// header and its length, errProxyNeedMore when b is a valid but incomplete
// start (read more and call again), or an error wrapping
// errProxyMalformed. It never reads past the header, and never panics on
// any input (FuzzParseProxyHeader).
func parseProxyHeader(b []byte) (proxyHeader, int, error) {
	n := min(len(b), len(proxyV2Sig))
	switch {
	case bytes.Equal(b[:n], proxyV2Sig[:n]):
		if n < len(proxyV2Sig) {
			return proxyHeader{}, 0, errProxyNeedMore
		}
		return parseProxyV2(b)
	case bytes.Equal(b[:min(len(b), len(proxyV1Prefix))], proxyV1Prefix[:min(len(b), len(proxyV1Prefix))]):
		return parseProxyV1(b)
	}
	return proxyHeader{}, 0, malformed("does not start with \"PROXY \" (v1) or the v2 signature")
}

func parseProxyV1(b []byte) (proxyHeader, int, error) {
	end := bytes.Index(b[:min(len(b), proxyV1Max)], []byte("\r\n"))
	if end < 0 {
		if len(b) >= proxyV1Max {
			return proxyHeader{}, 0, malformed("v1 line longer than %d bytes", proxyV1Max)
		}
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			return proxyHeader{}, 0, malformed("v1 line ends in LF without CR")
		}
		return proxyHeader{}, 0, errProxyNeedMore
	}
	line := string(b[len(proxyV1Prefix):end])
	n := end + 2
	if rest, ok := cutWord(line, "UNKNOWN"); ok {
		// "PROXY UNKNOWN" may be followed by anything: the receiver ignores
		// it and uses the connection's own addresses.
		if rest != "" && rest[0] != ' ' {
			return proxyHeader{}, 0, malformed("v1 protocol %q", line)
		}
		return proxyHeader{local: true}, n, nil
	}
	var want4 bool
	switch {
	case hasWord(line, "TCP4"):
		want4 = true
	case hasWord(line, "TCP6"):
	default:
		return proxyHeader{}, 0, malformed("v1 protocol must be TCP4, TCP6 or UNKNOWN")
	}
	// Single spaces only: an empty field (two spaces, a trailing space)
	// fails the address or port check below.
	fields := strings.Split(line[5:], " ")
	if len(fields) != 4 {
		return proxyHeader{}, 0, malformed("v1 wants 4 fields after the protocol, separated by single spaces")
	}
	var addrs [2]netip.Addr
	for i := range 2 {
		a, err := netip.ParseAddr(fields[i])
		if err != nil || a.Zone() != "" || a.Is4() != want4 {
			return proxyHeader{}, 0, malformed("v1 address %q does not match %s", fields[i], line[:4])
		}
		addrs[i] = a.Unmap()
	}
	var ports [2]uint16
	for i := range 2 {
		p, err := parseV1Port(fields[2+i])
		if err != nil {
			return proxyHeader{}, 0, err
		}
		ports[i] = p
	}
	return proxyHeader{src: netip.AddrPortFrom(addrs[0], ports[0]), dst: netip.AddrPortFrom(addrs[1], ports[1])}, n, nil
}

// cutWord returns what follows word at the start of s.
func cutWord(s, word string) (string, bool) {
	if len(s) < len(word) || s[:len(word)] != word {
		return "", false
	}
	return s[len(word):], true
}

// hasWord reports whether s starts with word followed by a space.
func hasWord(s, word string) bool {
	rest, ok := cutWord(s, word)
	return ok && rest != "" && rest[0] == ' '
}

// parseV1Port accepts 0-65535 in decimal without a sign or leading zeros,
// as the spec writes them.
func parseV1Port(s string) (uint16, error) {
	if s == "" || len(s) > 5 || (len(s) > 1 && s[0] == '0') {
		return 0, malformed("v1 port %q", s)
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, malformed("v1 port %q", s)
		}
	}
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, malformed("v1 port %q", s)
	}
	return uint16(p), nil
}

// v2 command, family and transport bytes.
const (
	proxyV2Local  = 0x20
	proxyV2Proxy  = 0x21
	proxyV2Unspec = 0x00
	proxyV2TCP4   = 0x11
	proxyV2UDP4   = 0x12
	proxyV2TCP6   = 0x21
	proxyV2UDP6   = 0x22
	// AF_UNIX stream and datagram.
	proxyV2UnixStream = 0x31
	proxyV2UnixDgram  = 0x32
	proxyV2Inet4      = 12 // src addr, dst addr, src port, dst port
	proxyV2Inet6      = 36
	proxyV2TLVHead    = 3 // type, 16-bit length
)

func parseProxyV2(b []byte) (proxyHeader, int, error) {
	if len(b) < proxyV2HeaderLen {
		return proxyHeader{}, 0, errProxyNeedMore
	}
	verCmd, famProto := b[12], b[13]
	length := int(binary.BigEndian.Uint16(b[14:16]))
	total := proxyV2HeaderLen + length
	if verCmd != proxyV2Local && verCmd != proxyV2Proxy {
		return proxyHeader{}, 0, malformed("v2 version/command byte 0x%02x", verCmd)
	}
	if total > proxyHeaderMax {
		return proxyHeader{}, 0, malformed("v2 header of %d bytes, l4lb accepts up to %d", total, proxyHeaderMax)
	}
	if len(b) < total {
		return proxyHeader{}, 0, errProxyNeedMore
	}
	body := b[proxyV2HeaderLen:total]
	var h proxyHeader
	var addrLen int
	switch famProto {
	case proxyV2TCP4:
		addrLen = proxyV2Inet4
	case proxyV2TCP6:
		addrLen = proxyV2Inet6
	case proxyV2Unspec, proxyV2UnixStream, proxyV2UnixDgram:
		// No address l4lb can use (UNSPEC's block has no set layout):
		// the spec lets a receiver go on with the connection's own
		// addresses, as HAProxy does, and as for v1 UNKNOWN.
		return proxyHeader{local: true}, total, nil
	case proxyV2UDP4, proxyV2UDP6:
		if verCmd == proxyV2Proxy {
			return proxyHeader{}, 0, malformed("v2 header for a datagram connection on a TCP one")
		}
	default:
		if verCmd == proxyV2Proxy {
			return proxyHeader{}, 0, malformed("v2 family/transport byte 0x%02x", famProto)
		}
	}
	if verCmd == proxyV2Local {
		// A health check of the balancer in front: the spec says to ignore
		// the address block, whatever it holds.
		return proxyHeader{local: true}, total, nil
	}
	if len(body) < addrLen {
		return proxyHeader{}, 0, malformed("v2 address block of %d bytes, want %d", len(body), addrLen)
	}
	switch addrLen {
	case proxyV2Inet4:
		h.src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(body[0:4])), binary.BigEndian.Uint16(body[8:10]))
		h.dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(body[4:8])), binary.BigEndian.Uint16(body[10:12]))
	case proxyV2Inet6:
		h.src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(body[0:16])).Unmap(), binary.BigEndian.Uint16(body[32:34]))
		h.dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(body[16:32])).Unmap(), binary.BigEndian.Uint16(body[34:36]))
	}
	// TLVs must tile the rest exactly: a length that runs past the header
	// is a corrupt or hostile header.
	for tlvs := body[addrLen:]; len(tlvs) > 0; {
		if len(tlvs) < proxyV2TLVHead {
			return proxyHeader{}, 0, malformed("v2 TLV header cut short")
		}
		n := proxyV2TLVHead + int(binary.BigEndian.Uint16(tlvs[1:3]))
		if n > len(tlvs) {
			return proxyHeader{}, 0, malformed("v2 TLV of %d bytes runs past the header", n)
		}
		tlvs = tlvs[n:]
	}
	return h, total, nil
}

// appendProxyHeader appends the header of version v for a connection from
// src to dst (udp: a v2 DGRAM header). The two addresses must share a
// family in the header: if they do not (an IPv4 client carried in through
// an IPv6 address), both are written as IPv6, IPv4 mapped.
func appendProxyHeader(b []byte, v config.ProxyProtocol, src, dst netip.AddrPort, udp bool) []byte {
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	four := sa.Is4() && da.Is4()
	if !four {
		sa, da = netip.AddrFrom16(sa.As16()), netip.AddrFrom16(da.As16())
	}
	if v == config.ProxyV1 {
		b = append(b, "PROXY TCP6 "...)
		if four {
			b[len(b)-2] = '4'
		}
		b = sa.AppendTo(b)
		b = append(b, ' ')
		b = da.AppendTo(b)
		b = append(b, ' ')
		b = strconv.AppendUint(b, uint64(src.Port()), 10)
		b = append(b, ' ')
		b = strconv.AppendUint(b, uint64(dst.Port()), 10)
		return append(b, '\r', '\n')
	}
	b = append(b, proxyV2Sig...)
	fam, addrLen := byte(proxyV2TCP6), proxyV2Inet6
	if four {
		fam, addrLen = proxyV2TCP4, proxyV2Inet4
	}
	if udp {
		fam++ // DGRAM is STREAM + 1 in both families
	}
	b = append(b, proxyV2Proxy, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(addrLen))
	if four {
		s4, d4 := sa.As4(), da.As4()
		b = append(append(b, s4[:]...), d4[:]...)
	} else {
		s16, d16 := sa.As16(), da.As16()
		b = append(append(b, s16[:]...), d16[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

// appendProxyLocalHeader appends the header of version v that l4lb's own
// connections carry (health probes): v1 "PROXY UNKNOWN", v2 the LOCAL
// command with no address. The receiver keeps the connection's own
// addresses. The same v2 header prefixes a UDP probe datagram: a LOCAL
// header's family and transport are UNSPEC whatever the socket.
func appendProxyLocalHeader(b []byte, v config.ProxyProtocol) []byte {
	if v == config.ProxyV1 {
		return append(b, "PROXY UNKNOWN\r\n"...)
	}
	b = append(b, proxyV2Sig...)
	return append(b, proxyV2Local, proxyV2Unspec, 0, 0)
}

// tcpCloseWait is TCP_CLOSE_WAIT in tcp_info's state: the peer has sent
// its FIN; tcpClose is TCP_CLOSE: the connection is gone (reset), or
// never was.
const (
	tcpCloseWait = 8
	tcpClose     = 7
)

// errProxyTimeout: the header did not arrive whole within its deadline.
var errProxyTimeout = errors.New("no complete PROXY header in time")

// peekProxyHeader reads the PROXY header a trusted balancer sends first on
// the non-blocking socket fd. It peeks (MSG_PEEK) until the bytes waiting
// hold a whole header, then consumes exactly the header: what the client
// sent after it stays in the socket for the proxy. done is false while
// the header is incomplete and the socket has no more bytes: call again
// when it is readable. Once done, err is nil, an error wrapping
// errProxyMalformed, or a read error.
func peekProxyHeader(fd int, buf *[proxyHeaderMax]byte) (h proxyHeader, done bool, err error) {
	for {
		n, _, err := unix.Recvfrom(fd, buf[:], unix.MSG_PEEK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return h, false, nil
		case err != nil:
			return h, true, err
		case n == 0:
			return h, true, fmt.Errorf("%w: connection closed before the header ended: %w", errProxyMalformed, io.ErrUnexpectedEOF)
		}
		h, size, perr := parseProxyHeader(buf[:n])
		if perr == errProxyNeedMore {
			// A peek shows the same bytes again after the client's FIN,
			// never a 0: ask TCP whether the client is done sending.
			if info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil && info.State == tcpCloseWait {
				return h, true, fmt.Errorf("%w: connection closed before the header ended: %w", errProxyMalformed, io.ErrUnexpectedEOF)
			}
			// Wait for more: each arrival (data or FIN) is a new edge.
			return h, false, nil
		}
		if perr == nil {
			// The bytes are there: this read takes exactly them.
			if n, err := unix.Read(fd, buf[:size]); err != nil {
				perr = err
			} else if n != size {
				// Stopped at an urgent mark: the rest would be
				// proxied as the client's data.
				perr = malformed("header read cut short at %d of %d bytes", n, size)
			}
		}
		return h, true, perr
	}
}

// readProxyHeader is peekProxyHeader on a *net.TCPConn, waiting on Go's
// netpoller until deadline: the tests' backends read l4lb's headers with
// it. It returns errProxyTimeout when the header is not whole by then.
func readProxyHeader(conn *net.TCPConn, deadline time.Time) (proxyHeader, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return proxyHeader{}, err
	}
	buf := new([proxyHeaderMax]byte)
	conn.SetReadDeadline(deadline)
	defer conn.SetReadDeadline(time.Time{})
	var h proxyHeader
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		var done bool
		h, done, perr = peekProxyHeader(int(fd), buf)
		return done
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return proxyHeader{}, errProxyTimeout
	}
	if err != nil {
		return proxyHeader{}, err
	}
	return h, perr
}

// flowProxyHeader is the PROXY v2 header (DGRAM) of a new UDP flow from
// client, or nil when the service sends none. It is built once per flow:
// every datagram of the flow carries the same one.
func (w *udpWorker) flowProxyHeader(client netip.AddrPort) []byte {
	if w.p.svc.route.Load().cfg.ProxyProtocol != config.ProxyV2 {
		return nil
	}
	// The address the client sent to: the listen address (see the README
	// on wildcard UDP listen addresses).
	dst := w.conn.LocalAddr().(*net.UDPAddr).AddrPort()
	return appendProxyHeader(nil, config.ProxyV2, client, dst, true)
}

// withProxyHeader returns b as send slot k should carry it to f's backend:
// b itself, or a copy behind f's PROXY v2 header. The copy goes to a
// buffer of the worker's own per slot, which grows to the largest datagram
// once and is reused, so prefixing allocates nothing per datagram; the
// copy of a datagram costs far less than the sendmmsg that carries it.
func (w *udpWorker) withProxyHeader(f *udpFlow, k int, b []byte) []byte {
	if f.proxyHeader == nil {
		return b
	}
	if w.prefixed == nil {
		w.prefixed = make([][]byte, w.out.b.Len())
	}
	w.prefixed[k] = append(append(w.prefixed[k][:0], f.proxyHeader...), b...)
	return w.prefixed[k]
}
