package l4

import (
	"encoding/binary"
	"net/netip"

	"github.com/l4lb/l4lb/config"
)

// The hashes in this file use fixed constants and never hash/maphash or a
// random seed: two l4lb nodes behind the same ECMP router must send a client
// to the same backend, and so must a node before and after a restart or an
// upgrade. Changing any constant here moves most clients to another backend;
// TestMaglevGolden fails when one changes.
const (
	clientKeySeed = 0x243f6a8885a308d3 // the first fraction bits of pi
	clientPortTag = 0x13198a2e03707344 // the next ones; keeps ip-only and ip+port keys apart
)

// mix64 is the MurmurHash3 64-bit finaliser: a bijection in which every input
// bit flips each output bit with probability close to 1/2, so key % size is
// uniform even for addresses that differ in their last bits only.
func mix64(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// clientKey hashes the client address for the balancer. With
// config.SourceIPPort it hashes the IP and the port, so one client's
// connections spread over backends; with anything else (config.SourceIP) the
// IP only, so all of a client's connections land on one backend.
//
// The address is taken in its 16-byte form, in which an IPv4 address and its
// IPv4-mapped IPv6 form (::ffff:1.2.3.4, what a dual-stack socket reports) are
// the same bytes: this is the normalisation Unmap would do, without a branch.
// The zone is ignored. Deterministic and allocation-free.
func clientKey(client netip.AddrPort, hk config.HashKey) uint64 {
	a := client.Addr().As16()
	h := mix64(clientKeySeed ^ binary.BigEndian.Uint64(a[:8]))
	h = mix64(h ^ binary.BigEndian.Uint64(a[8:]))
	if hk == config.SourceIPPort {
		h = mix64(h ^ clientPortTag ^ uint64(client.Port()))
	}
	return h
}
