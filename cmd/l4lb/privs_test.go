package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"slices"
	"strconv"
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
		acct, err := processIDs(config.Process{User: tc.user, Group: tc.group})
		uid, gid := acct.uid, acct.gid
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

// dropTo, in a child started by TestPrivilegeDropKeepsSupplementaryGroups
// (see TestMain), drops root for user and prints the groups it then has.
func dropTo(user string) int {
	if err := dropPrivileges(config.Process{User: user}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	groups, err := os.Getgroups()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(os.Getuid(), os.Getgid(), groups)
	return 0
}

// Dropping root for a user keeps the user's supplementary groups, as
// initgroups(3) does for HAProxy and nginx: with a config at 0640
// root:ssl-cert and user = "postgres" (a member of ssl-cert), every reload
// after the drop must still read the file.
func TestPrivilegeDropKeepsSupplementaryGroups(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (make test runs as root), to drop it")
	}
	member, group := supplementaryMember(t)
	u, err := user.Lookup(member)
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command(os.Args[0])
	child.Env = append(os.Environ(), "L4LB_TEST_DROP_TO="+member)
	out, err := child.CombinedOutput()
	if err != nil {
		t.Fatalf("drop to %s: %v: %s", member, err, out)
	}
	// "uid gid [g1 g2 ...]"
	fields := strings.SplitN(strings.TrimSpace(string(out)), " ", 3)
	if len(fields) != 3 {
		t.Fatalf("child said %q", out)
	}
	if fields[0] != u.Uid || fields[1] != u.Gid {
		t.Errorf("uid and gid after the drop: %s %s, want %s %s", fields[0], fields[1], u.Uid, u.Gid)
	}
	if !slices.Contains(strings.Fields(strings.Trim(fields[2], "[]")), group.Gid) {
		t.Errorf("groups after dropping root for %s: %s; want them to include %s (%s), which %s is a member of",
			member, fields[2], group.Gid, group.Name, member)
	}
}

// supplementaryMember creates a system user whose primary group is
// nogroup and who is a member of a group of its own, and removes both at
// cleanup: a fresh host need not have such a user.
func supplementaryMember(t *testing.T) (string, *user.Group) {
	t.Helper()
	suffix := strconv.Itoa(os.Getpid())
	name, groupName := "l4lbtest"+suffix, "l4lbtestgrp"+suffix
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("groupadd", "--system", groupName)
	t.Cleanup(func() { exec.Command("groupdel", groupName).Run() })
	run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--gid", "nogroup", "--groups", groupName, name)
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	group, err := user.LookupGroup(groupName)
	if err != nil {
		t.Fatal(err)
	}
	return name, group
}
