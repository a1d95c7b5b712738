package main

import (
	"strings"
	"testing"

	"github.com/l4lb/l4lb/config"
)

// Users and groups resolve by name or number; a number with no entry in
// the user database is taken as it is (as HAProxy's uid), which needs its
// group named, since there is no primary group to take.
func TestProcessIDs(t *testing.T) {
	for _, tc := range []struct {
		user, group string
		uid, gid    int
		err         string
	}{
		{user: "root", uid: 0, gid: 0},
		{user: "0", group: "root", uid: 0, gid: 0},
		{user: "54321", group: "54322", uid: 54321, gid: 54322},
		{user: "54321", err: `process.user "54321" has no entry on this host, so no primary group: set process.group too`},
		{user: "no-such-user-l4lb", err: `process.user "no-such-user-l4lb": no such user on this host`},
		{user: "root", group: "no-such-group-l4lb", err: `process.group "no-such-group-l4lb": no such group on this host`},
	} {
		uid, gid, err := processIDs(config.Process{User: tc.user, Group: tc.group})
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("user %q group %q: error %v, want %q", tc.user, tc.group, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("user %q group %q: %v", tc.user, tc.group, err)
		case tc.err == "" && (uid != tc.uid || gid != tc.gid):
			t.Errorf("user %q group %q: uid %d gid %d, want %d %d", tc.user, tc.group, uid, gid, tc.uid, tc.gid)
		}
	}
}
