package l4

import (
	"fmt"
	"slices"
	"strings"
)

// DefaultMaglevSize is the lookup table size newBalancer uses. It must be
// prime (every skip then walks the whole table); 65537 is the paper's choice,
// over 100 slots per backend up to ~650 backends, which keeps the slot
// imbalance and the disruption on a backend change near 1%, for 256 KiB of
// int32 per service.
const DefaultMaglevSize = 65537

// Seeds of the two member-key hashes that give each backend its offset and
// skip. Fixed for the same reason as clientKeySeed: every node must compute
// the same permutations.
const (
	maglevOffsetSeed = 0xa4093822299f31d0
	maglevSkipSeed   = 0x082efa98ec4e6c89
)

// maglev is consistent hashing by lookup table (Eisenbud et al., "Maglev: A
// Fast and Reliable Software Network Load Balancer", NSDI 2016): each backend
// fills table slots in the order of its own permutation of the table, so
// adding or removing a backend moves few slots that belonged to the others,
// and a pick is one array read.
//
// The table depends only on the set of (key, weight) pairs, never on the order
// the caller lists members in: newMaglev sorts by key before filling, because
// every l4lb node must build the same table to send a client to the same
// backend, and the config file, health events or a reload may list the
// backends in different orders on different nodes.
type maglev struct {
	// table holds, per slot, an index into the members slice newMaglev got
	// (not the sorted order). nil when there are no members.
	table []int32
	n     int // number of members
}

var _ balancer = (*maglev)(nil)

// newMaglev builds the table. Weighted as in Envoy: the fill goes in rounds,
// in each round every member earns credit equal to its weight and takes its
// next slot each time its credit reaches the largest weight, so slot counts are
// proportional to weights within one slot per member. It panics when size is
// not prime or a member has weight < 1: both are programming errors, the
// config rejects them and callers drop zero-weight backends.
//
// Building costs about size·ln(size) probes at most (the last free slots are
// the hard ones to hit), 0.4 to 0.7 million for 65537 slots whatever the
// number of members: 1 to 2 ms.
func newMaglev(members []member, size int) *maglev {
	if !isPrime(size) {
		panic(fmt.Sprintf("l4: maglev table size %d is not prime", size))
	}
	m := &maglev{n: len(members)}
	if len(members) == 0 {
		return m
	}

	// fill is one member's state during the build, in key order.
	type fill struct {
		index  int32  // index into members
		weight int    // > 0
		credit int    // earned, not yet spent on a slot
		pos    uint64 // next slot of this member's permutation to try
		skip   uint64 // in [1, size-1]; size prime, so pos visits every slot
	}
	fills := make([]fill, len(members))
	maxWeight := 0
	for i, mb := range members {
		if mb.weight < 1 {
			panic(fmt.Sprintf("l4: maglev member %s has weight %d", mb.key, mb.weight))
		}
		maxWeight = max(maxWeight, mb.weight)
		fills[i] = fill{
			index:  int32(i),
			weight: mb.weight,
			pos:    hashString(mb.key, maglevOffsetSeed) % uint64(size),
			skip:   hashString(mb.key, maglevSkipSeed)%uint64(size-1) + 1,
		}
	}
	slices.SortStableFunc(fills, func(a, b fill) int {
		if c := strings.Compare(members[a.index].key, members[b.index].key); c != 0 {
			return c
		}
		// Duplicate keys should not happen (the config rejects duplicate
		// backends); the weight keeps the table independent of caller
		// order even then, as long as the duplicates differ.
		return a.weight - b.weight
	})

	// Most of the build is probing for a free slot, about size·ln(size)
	// probes in all, as the last free slots are rare. The probes read a
	// bitmap (8 KiB for 65537 slots, it stays in L1) rather than the 256 KiB
	// table.
	table := make([]int32, size)
	taken := make([]uint64, (size+63)/64)
	msize := uint64(size)
	filled := 0
	for {
		for j := range fills {
			f := &fills[j]
			f.credit += f.weight
			if f.credit < maxWeight {
				continue
			}
			f.credit -= maxWeight
			c, skip := f.pos, f.skip
			for taken[c/64]&(1<<(c%64)) != 0 {
				c = addMod(c, skip, msize)
			}
			taken[c/64] |= 1 << (c % 64)
			table[c] = f.index
			f.pos = addMod(c, skip, msize)
			filled++
			if filled == size {
				m.table = table
				return m
			}
		}
	}
}

// addMod returns (a + b) mod m for a, b < m, without a division or a branch:
// the wrap happens at random, so a branch would be mispredicted often. When
// a+b < m, a+b-m wraps around to above a+b and min keeps a+b; min compiles to
// a conditional move.
func addMod(a, b, m uint64) uint64 {
	s := a + b
	return min(s, s-m)
}

// pick returns the owner of key's slot, or, with tried, the first entry not
// tried walking the table forward from that slot. Table neighbours are
// unrelated backends, so the walk spreads retries of a failed backend's keys
// over all the others, and every node retries a key in the same order.
func (m *maglev) pick(key uint64, tried []int) int {
	if m.n == 0 {
		return -1
	}
	slot := int(key % uint64(len(m.table)))
	if len(tried) == 0 {
		return int(m.table[slot])
	}
	if allTried(m.n, tried) {
		return -1
	}
	for range len(m.table) {
		if i := int(m.table[slot]); !contains(tried, i) {
			return i
		}
		slot++
		if slot == len(m.table) {
			slot = 0
		}
	}
	// Only a member whose weight is too small to win a single slot (say
	// weight 1 beside 1000 backends of weight 1000) is absent from the table;
	// it is still a member, so it is still a last resort.
	for i := range m.n {
		if !contains(tried, i) {
			return i
		}
	}
	return -1
}

// hashString is 64-bit FNV-1a from a seeded basis, finished with mix64 (FNV
// alone leaves its low bits, the ones % size reads, poorly mixed).
func hashString(s string, seed uint64) uint64 {
	const prime = 0x100000001b3
	h := seed ^ 0xcbf29ce484222325
	for i := range len(s) {
		h ^= uint64(s[i])
		h *= prime
	}
	return mix64(h)
}

// isPrime is trial division: table sizes are small enough (sqrt(65537) < 257)
// that nothing cleverer pays off.
func isPrime(n int) bool {
	if n < 2 {
		return false
	}
	for d := 2; d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}
