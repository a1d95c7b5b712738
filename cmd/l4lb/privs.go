package main

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"slices"
	"strconv"
	"syscall"

	"github.com/l4lb/l4lb/config"
)

// account is who l4lb runs as once it drops root.
type account struct {
	uid, gid int
	// groups are the supplementary groups: the user's, from the group
	// database (its primary group included), and gid. HAProxy and nginx
	// set them with initgroups(3) too, so that a file the user reads
	// through a group it belongs to, such as a config at 0640
	// root:ssl-cert, stays readable after the drop.
	groups []int
}

// processIDs resolves p.User and p.Group (names or numbers) to the uid,
// gid and groups l4lb will run as; Group "" is the user's primary group.
// run calls it before binding anything, and check too, so that a user
// missing on this host is reported before a single service starts. A
// number with no entry in the user database is taken as it is, as
// HAProxy's uid is (containers often have none); its group must then be
// given, and is its only one.
func processIDs(p config.Process) (account, error) {
	var acct account
	gidStr := ""
	u, err := lookupUser(p.User)
	switch {
	case err == nil:
		acct.uid, err = strconv.Atoi(u.Uid)
		if err != nil {
			return account{}, fmt.Errorf("process.user %q: uid %q: %w", p.User, u.Uid, err)
		}
		gidStr = u.Gid
	case isUnknown(err) && isNumber(p.User):
		acct.uid, _ = strconv.Atoi(p.User)
		if p.Group == "" {
			return account{}, fmt.Errorf("process.user %q has no entry on this host, so no primary group: set process.group too", p.User)
		}
	case isUnknown(err):
		return account{}, fmt.Errorf("process.user %q: no such user on this host", p.User)
	default:
		return account{}, fmt.Errorf("process.user %q: %w", p.User, err)
	}
	if p.Group != "" {
		g, err := lookupGroup(p.Group)
		switch {
		case err == nil:
			gidStr = g.Gid
		case isUnknown(err) && isNumber(p.Group):
			gidStr = p.Group
		case isUnknown(err):
			return account{}, fmt.Errorf("process.group %q: no such group on this host", p.Group)
		default:
			return account{}, fmt.Errorf("process.group %q: %w", p.Group, err)
		}
	}
	if acct.gid, err = strconv.Atoi(gidStr); err != nil {
		return account{}, fmt.Errorf("process.group: gid %q: %w", gidStr, err)
	}
	acct.groups = []int{acct.gid}
	if u != nil {
		ids, err := u.GroupIds()
		if err != nil {
			return account{}, fmt.Errorf("process.user %q: its groups: %w", p.User, err)
		}
		for _, id := range ids {
			n, err := strconv.Atoi(id)
			if err != nil {
				return account{}, fmt.Errorf("process.user %q: group id %q: %w", p.User, id, err)
			}
			if !slices.Contains(acct.groups, n) {
				acct.groups = append(acct.groups, n)
			}
		}
	}
	return acct, nil
}

// lookupUser finds name, or a number as a uid.
func lookupUser(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if isUnknown(err) && isNumber(name) {
		return user.LookupId(name)
	}
	return u, err
}

// lookupGroup finds name, or a number as a gid.
func lookupGroup(name string) (*user.Group, error) {
	g, err := user.LookupGroup(name)
	if isUnknown(err) && isNumber(name) {
		return user.LookupGroupId(name)
	}
	return g, err
}

// isUnknown reports whether a lookup failed for want of an entry, rather
// than for a database that could not be read.
func isUnknown(err error) bool {
	var noUser user.UnknownUserError
	var noUID user.UnknownUserIdError
	var noGroup user.UnknownGroupError
	var noGID user.UnknownGroupIdError
	return errors.As(err, &noUser) || errors.As(err, &noUID) || errors.As(err, &noGroup) || errors.As(err, &noGID)
}

// isNumber reports whether s is a uid or gid rather than a name.
func isNumber(s string) bool {
	_, err := strconv.Atoi(s)
	return err == nil
}

// dropPrivileges makes the whole process run as p.User (and p.Group, or
// the user's primary group, and the user's supplementary groups) from now
// on. It runs once the sockets are bound: binding ports below 1024 is what
// root was needed for. On Linux, Go applies setgroups, setgid and setuid to
// every thread of the process.
func dropPrivileges(p config.Process) error {
	if p.User == "" {
		return nil
	}
	acct, err := processIDs(p)
	if err != nil {
		return err
	}
	if err := canBecome(p, acct); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return nil // already that user
	}
	// Supplementary groups first, then the group, then the user: after
	// setuid nothing else may be changed.
	if err := syscall.Setgroups(acct.groups); err != nil {
		return fmt.Errorf("setgroups %v: %w", acct.groups, err)
	}
	if err := syscall.Setgid(acct.gid); err != nil {
		return fmt.Errorf("setgid %d: %w", acct.gid, err)
	}
	if err := syscall.Setuid(acct.uid); err != nil {
		return fmt.Errorf("setuid %d: %w", acct.uid, err)
	}
	return nil
}

// canBecome says whether this process can run as acct (p's user): as
// root, or as that user already.
func canBecome(p config.Process, acct account) error {
	if euid := os.Geteuid(); euid != 0 && euid != acct.uid {
		return fmt.Errorf("process.user %q: l4lb runs as uid %d, not root: it cannot change user", p.User, euid)
	}
	return nil
}
