package l4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/l4lb/l4lb/config"
)

func v2Header(cmd, fam byte, body []byte) []byte {
	b := append([]byte{}, proxyV2Sig...)
	b = append(b, cmd, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(len(body)))
	return append(b, body...)
}

func TestParseProxyHeader(t *testing.T) {
	inet4 := []byte{192, 0, 2, 1, 198, 51, 100, 2, 0x30, 0x39, 0x01, 0xbb} // 192.0.2.1:12345 → 198.51.100.2:443
	tests := []struct {
		name     string
		in       []byte
		wantErr  error // nil, errProxyNeedMore or errProxyMalformed
		src, dst string
		local    bool
		size     int
	}{
		{name: "v1 tcp4", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 12345 443\r\nhello"), src: "192.0.2.1:12345", dst: "198.51.100.2:443", size: 45},
		{name: "v1 tcp6", in: []byte("PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"), src: "[2001:db8::1]:1", dst: "[2001:db8::2]:65535", size: 44},
		{name: "v1 tcp6 mapped is unmapped", in: []byte("PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n"), src: "192.0.2.1:1", dst: "[2001:db8::2]:2", size: 45},
		{name: "v1 unknown", in: []byte("PROXY UNKNOWN\r\n"), local: true, size: 15},
		{name: "v1 unknown with junk", in: []byte("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), local: true, size: 35},
		{name: "v1 longest", in: []byte("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"), src: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", dst: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", size: 104},
		{name: "empty", in: nil, wantErr: errProxyNeedMore},
		{name: "v1 partial", in: []byte("PROXY TCP4 192.0"), wantErr: errProxyNeedMore},
		{name: "v1 prefix only", in: []byte("PRO"), wantErr: errProxyNeedMore},
		{name: "v1 cr without lf yet", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r"), wantErr: errProxyNeedMore},
		{name: "not proxy", in: []byte("GET / HTTP/1.1\r\n"), wantErr: errProxyMalformed},
		{name: "lowercase", in: []byte("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 too long", in: append([]byte("PROXY TCP4 "), bytes.Repeat([]byte("1"), 120)...), wantErr: errProxyMalformed},
		{name: "v1 lf only", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n"), wantErr: errProxyMalformed},
		{name: "v1 family mismatch", in: []byte("PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 tcp6 with ipv4", in: []byte("PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 port range", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 port leading zero", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 080 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 port sign", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 +80 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 double space", in: []byte("PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 missing field", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n"), wantErr: errProxyMalformed},
		{name: "v1 extra field", in: []byte("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n"), wantErr: errProxyMalformed},
		{name: "v1 ipv4 leading zero", in: []byte("PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 zone", in: []byte("PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n"), wantErr: errProxyMalformed},
		{name: "v1 udp4", in: []byte("PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n"), wantErr: errProxyMalformed},

		{name: "v2 tcp4", in: append(v2Header(0x21, 0x11, inet4), "data"...), src: "192.0.2.1:12345", dst: "198.51.100.2:443", size: 28},
		{name: "v2 tcp6", in: v2Header(0x21, 0x21, append(append(netip.MustParseAddr("2001:db8::1").AsSlice(), netip.MustParseAddr("2001:db8::2").AsSlice()...), 0, 1, 0, 2)), src: "[2001:db8::1]:1", dst: "[2001:db8::2]:2", size: 52},
		{name: "v2 with tlvs", in: v2Header(0x21, 0x11, append(append([]byte{}, inet4...), 0x05, 0, 3, 'a', 'b', 'c', 0x04, 0, 0)), src: "192.0.2.1:12345", dst: "198.51.100.2:443", size: 16 + 12 + 6 + 3},
		{name: "v2 local", in: v2Header(0x20, 0x00, nil), local: true, size: 16},
		{name: "v2 local ignores block", in: v2Header(0x20, 0x11, []byte{1, 2, 3}), local: true, size: 19},
		{name: "v2 unspec", in: v2Header(0x21, 0x00, nil), local: true, size: 16},
		{name: "v2 partial signature", in: proxyV2Sig[:7], wantErr: errProxyNeedMore},
		{name: "v2 partial header", in: v2Header(0x21, 0x11, inet4)[:20], wantErr: errProxyNeedMore},
		{name: "v2 bad version", in: v2Header(0x11, 0x11, inet4), wantErr: errProxyMalformed},
		{name: "v2 bad command", in: v2Header(0x22, 0x11, inet4), wantErr: errProxyMalformed},
		{name: "v2 short address block", in: v2Header(0x21, 0x11, inet4[:11]), wantErr: errProxyMalformed},
		{name: "v2 short inet6 block", in: v2Header(0x21, 0x21, inet4), wantErr: errProxyMalformed},
		{name: "v2 dgram on tcp", in: v2Header(0x21, 0x12, inet4), wantErr: errProxyMalformed},
		{name: "v2 unix stream", in: v2Header(0x21, 0x31, make([]byte, 216)), local: true, size: 16 + 216},
		{name: "v2 unix datagram", in: v2Header(0x21, 0x32, make([]byte, 216)), local: true, size: 16 + 216},
		{name: "v2 unspec with an address block", in: v2Header(0x21, 0x00, []byte{1, 2, 3, 4, 5}), local: true, size: 16 + 5},
		{name: "v2 bad family", in: v2Header(0x21, 0x41, inet4), wantErr: errProxyMalformed},
		{name: "v2 tlv past end", in: v2Header(0x21, 0x11, append(append([]byte{}, inet4...), 0x05, 0, 9, 'a')), wantErr: errProxyMalformed},
		{name: "v2 tlv cut", in: v2Header(0x21, 0x11, append(append([]byte{}, inet4...), 0x05, 0)), wantErr: errProxyMalformed},
		{name: "v2 too long", in: v2Header(0x21, 0x11, make([]byte, proxyHeaderMax)), wantErr: errProxyMalformed},
		{name: "v2 too long announced", in: append(append([]byte{}, proxyV2Sig...), 0x21, 0x11, 0xff, 0xff), wantErr: errProxyMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, n, err := parseProxyHeader(tt.in)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if n != tt.size || h.local != tt.local {
				t.Errorf("size %d local %v, want %d %v", n, h.local, tt.size, tt.local)
			}
			if !tt.local && (h.src.String() != tt.src || h.dst.String() != tt.dst) {
				t.Errorf("src %s dst %s, want %s %s", h.src, h.dst, tt.src, tt.dst)
			}
		})
	}
}

// TestProxyHeaderRoundTrip checks that what appendProxyHeader writes
// parses back to the same addresses, for both versions and families.
func TestProxyHeaderRoundTrip(t *testing.T) {
	pairs := []struct{ src, dst, wantSrc, wantDst string }{
		{"192.0.2.1:40000", "10.0.0.1:5432", "", ""},
		{"[2001:db8::1]:40000", "[2001:db8::2]:5432", "", ""},
		// Mixed families are written as IPv6 with IPv4 mapped, which the
		// parser unmaps again.
		{"192.0.2.1:40000", "[2001:db8::2]:5432", "", ""},
	}
	for _, v := range []config.ProxyProtocol{config.ProxyV1, config.ProxyV2} {
		for _, pr := range pairs {
			src, dst := netip.MustParseAddrPort(pr.src), netip.MustParseAddrPort(pr.dst)
			b := appendProxyHeader(nil, v, src, dst, false)
			h, n, err := parseProxyHeader(append(b, "payload"...))
			if err != nil || n != len(b) || h.src != src || h.dst != dst {
				t.Errorf("%s %s→%s: %q parsed to %+v, %d, %v", v, src, dst, b, h, n, err)
			}
		}
	}
	udp := appendProxyHeader(nil, config.ProxyV2, netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("10.0.0.1:53"), true)
	if udp[13] != proxyV2UDP4 || len(udp) != 28 {
		t.Errorf("v2 udp header %x: want family byte 0x12 and 28 bytes", udp)
	}
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestReadProxyHeader reads headers over real sockets: sent in pieces, it
// waits for the rest; it consumes exactly the header and leaves the data
// after it; a slow or malformed header fails.
func TestReadProxyHeader(t *testing.T) {
	t.Run("pieces and data after", func(t *testing.T) {
		client, server := tcpPair(t)
		go func() {
			client.Write([]byte("PROXY TCP4 192.0.2.1 "))
			time.Sleep(50 * time.Millisecond)
			client.Write([]byte("198.51.100.2 12345 443\r\nfirst bytes"))
		}()
		h, err := readProxyHeader(server, time.Now().Add(5*time.Second))
		if err != nil || h.src.String() != "192.0.2.1:12345" {
			t.Fatalf("header %+v, %v", h, err)
		}
		rest := make([]byte, len("first bytes"))
		server.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(server, rest); err != nil || string(rest) != "first bytes" {
			t.Fatalf("after the header: %q, %v", rest, err)
		}
	})
	t.Run("slow", func(t *testing.T) {
		client, server := tcpPair(t)
		client.Write([]byte("PROXY TCP4 192.0.2.1"))
		start := time.Now()
		_, err := readProxyHeader(server, time.Now().Add(200*time.Millisecond))
		if !errors.Is(err, errProxyTimeout) {
			t.Fatalf("err = %v, want errProxyTimeout", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v for a 200ms deadline", d)
		}
	})
	t.Run("malformed", func(t *testing.T) {
		client, server := tcpPair(t)
		client.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
		if _, err := readProxyHeader(server, time.Now().Add(5*time.Second)); !errors.Is(err, errProxyMalformed) {
			t.Fatalf("err = %v, want malformed", err)
		}
	})
	t.Run("closed early", func(t *testing.T) {
		client, server := tcpPair(t)
		client.Write([]byte("PROXY TCP4"))
		client.Close()
		if _, err := readProxyHeader(server, time.Now().Add(5*time.Second)); !errors.Is(err, errProxyMalformed) {
			t.Fatalf("err = %v, want malformed (cut short)", err)
		}
	})
}

// FuzzParseProxyHeader checks that no input makes the parser panic, read
// past its input, or accept a header it cannot account for.
func FuzzParseProxyHeader(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.1 198.51.100.2 12345 443\r\n"))
	f.Add([]byte("PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add(v2Header(0x21, 0x11, []byte{192, 0, 2, 1, 198, 51, 100, 2, 0x30, 0x39, 0x01, 0xbb, 0x05, 0, 1, 'x'}))
	f.Add(v2Header(0x20, 0x00, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, n, err := parseProxyHeader(b)
		if err != nil {
			if !errors.Is(err, errProxyNeedMore) && !errors.Is(err, errProxyMalformed) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if n <= 0 || n > len(b) || n > proxyHeaderMax {
			t.Fatalf("header size %d of %d bytes", n, len(b))
		}
		if !h.local && (!h.src.IsValid() || !h.dst.IsValid() || h.src.Addr().Is4In6()) {
			t.Fatalf("accepted header with addresses %v %v", h.src, h.dst)
		}
		// The parse must not depend on bytes past the header.
		h2, n2, err2 := parseProxyHeader(b[:n])
		if err2 != nil || n2 != n || h2 != h {
			t.Fatalf("header alone parses to %+v %d %v, with the rest to %+v %d", h2, n2, err2, h, n)
		}
	})
}

// FuzzProxyHeaderPrefixes checks that a header may arrive in any pieces,
// as TCP delivers it: every prefix of a header that parses whole is
// "need more", and no prefix of an input that is not malformed is
// malformed, so a slow balancer's header is never rejected for being
// read early.
func FuzzProxyHeaderPrefixes(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.1 198.51.100.2 12345 443\r\n"))
	f.Add([]byte("PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add(v2Header(0x21, 0x11, []byte{192, 0, 2, 1, 198, 51, 100, 2, 0x30, 0x39, 0x01, 0xbb, 0x05, 0, 1, 'x'}))
	f.Add(v2Header(0x20, 0x00, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, n, err := parseProxyHeader(b)
		if err == nil {
			for k := range n {
				if _, _, perr := parseProxyHeader(b[:k]); !errors.Is(perr, errProxyNeedMore) {
					t.Fatalf("%q parses whole (%d bytes) but its prefix %q gives %v", b[:n], n, b[:k], perr)
				}
			}
		}
		if errors.Is(err, errProxyMalformed) {
			return // a shorter prefix may be malformed already, or need more
		}
		for k := range len(b) {
			if _, _, perr := parseProxyHeader(b[:k]); errors.Is(perr, errProxyMalformed) {
				t.Fatalf("prefix %q is malformed (%v) but the whole %q gives %v", b[:k], perr, b, err)
			}
		}
	})
}
