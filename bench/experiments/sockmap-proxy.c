/*
 * sockmap-proxy: a measuring prototype, not a balancer.
 *
 * It answers one question for bench/floor.sh: does kernel-side forwarding
 * (a BPF sk_skb verdict program that redirects every segment received on one
 * socket to its peer's send path, so no byte and no wakeup reaches user space)
 * beat ringlb's io_uring relay on this kernel? It relays HTTP well enough for
 * wrk and nothing more: blocking connect, round robin over two backends, no
 * timeouts, and an end of stream may overtake bytes still queued in the
 * kernel's redirect worker (the reason it could not replace the relay as is).
 *
 * The BPF program is eleven instructions (twelve slots: the map load is two
 * wide) written out by hand, so that no compiler for BPF is needed:
 *     key = bpf_get_socket_cookie(skb)          // the receiving socket
 *     bpf_sk_redirect_hash(skb, &peers, &key, 0) // to its peer's egress
 *     return SK_PASS                            // not found: stay local
 * and the map holds cookie(client) -> backend, cookie(backend) -> client.
 *
 * usage: sockmap-proxy LISTEN_PORT BACKEND_PORT [BACKEND_PORT...]  (127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_FDS 65536
#define MAX_BACKENDS 16

static int peer[MAX_FDS];
static int map_fd;

static int bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static unsigned long long cookie(int fd)
{
	unsigned long long c = 0;
	socklen_t len = sizeof(c);
	getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &len);
	return c;
}

static int map_op(int cmd, unsigned long long key, int value)
{
	union bpf_attr a = { 0 };
	a.map_fd = map_fd;
	a.key = (unsigned long)&key;
	a.value = (unsigned long)&value;
	a.flags = BPF_ANY;
	return bpf(cmd, &a);
}

#define INSN(c, d, s, o, i) ((struct bpf_insn){ c, d, s, o, i })

static int load_program(void)
{
	union bpf_attr a = { 0 };
	a.map_type = BPF_MAP_TYPE_SOCKHASH;
	a.key_size = 8;
	a.value_size = 4;
	a.max_entries = MAX_FDS;
	map_fd = bpf(BPF_MAP_CREATE, &a);
	if (map_fd < 0) {
		perror("sockmap-proxy: creating the sockhash");
		return -1;
	}
	struct bpf_insn prog[] = {
		INSN(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),		/* r6 = skb */
		INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_get_socket_cookie),
		INSN(BPF_STX | BPF_DW | BPF_MEM, 10, 0, -8, 0),		/* key = r0 */
		INSN(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),		/* r1 = skb */
		INSN(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, map_fd),
		INSN(0, 0, 0, 0, 0),
		INSN(BPF_ALU64 | BPF_MOV | BPF_X, 3, 10, 0, 0),		/* r3 = &key */
		INSN(BPF_ALU64 | BPF_ADD | BPF_K, 3, 0, 0, -8),
		INSN(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0),		/* flags: egress */
		INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
		INSN(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, SK_PASS),
		INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
	};
	static char log[65536];
	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_SK_SKB;
	a.insns = (unsigned long)prog;
	a.insn_cnt = sizeof(prog) / sizeof(prog[0]);
	a.license = (unsigned long)"GPL";
	a.log_buf = (unsigned long)log;
	a.log_size = sizeof(log);
	a.log_level = 1;
	int prog_fd = bpf(BPF_PROG_LOAD, &a);
	if (prog_fd < 0) {
		perror("sockmap-proxy: loading the verdict program");
		fprintf(stderr, "%s\n", log);
		return -1;
	}
	memset(&a, 0, sizeof(a));
	a.target_fd = map_fd;
	a.attach_bpf_fd = prog_fd;
	a.attach_type = BPF_SK_SKB_VERDICT;
	if (bpf(BPF_PROG_ATTACH, &a) < 0) {
		perror("sockmap-proxy: attaching the verdict program");
		return -1;
	}
	return 0;
}

/* Bytes that arrived before the sockets joined the map are still queued on
 * the socket: move them by hand (good enough for request/response). */
static void drain(int from)
{
	char buf[65536];
	ssize_t n;
	while ((n = recv(from, buf, sizeof(buf), MSG_DONTWAIT)) > 0)
		send(peer[from], buf, n, MSG_NOSIGNAL);
}

static void pair(int ep, int client, const struct sockaddr_in *backend)
{
	int one = 1;
	int b = socket(AF_INET, SOCK_STREAM, 0);
	if (b < 0 || b >= MAX_FDS || client >= MAX_FDS) {
		close(client);
		if (b >= 0)
			close(b);
		return;
	}
	setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(b, (const struct sockaddr *)backend, sizeof(*backend)) < 0) {
		close(client);
		close(b);
		return;
	}
	peer[client] = b;
	peer[b] = client;
	if (map_op(BPF_MAP_UPDATE_ELEM, cookie(client), b) ||
	    map_op(BPF_MAP_UPDATE_ELEM, cookie(b), client)) {
		/* Not forwarded by the kernel: drop the pair rather than stall. */
		perror("sockmap-proxy: adding a pair to the sockhash");
		map_op(BPF_MAP_DELETE_ELEM, cookie(client), 0);
		close(client);
		close(b);
		return;
	}
	drain(client);
	drain(b);
	/* Not EPOLLIN: redirected segments make the socket look readable for
	 * an instant, and a level-triggered wakeup each time costs more than
	 * the redirect saves. */
	struct epoll_event e = { .events = EPOLLRDHUP, .data.fd = client };
	epoll_ctl(ep, EPOLL_CTL_ADD, client, &e);
	e.data.fd = b;
	epoll_ctl(ep, EPOLL_CTL_ADD, b, &e);
}

/* Closed only after the batch of events is handled, so that a second event
 * for either socket in the same batch never meets a reused fd. */
static int closing[2 * 64];
static int nclosing;

static void unpair(int fd)
{
	int other = peer[fd];
	if (other < 0)
		return; /* its peer's event came first in this batch */
	drain(fd);
	map_op(BPF_MAP_DELETE_ELEM, cookie(fd), 0);
	map_op(BPF_MAP_DELETE_ELEM, cookie(other), 0);
	peer[fd] = peer[other] = -1;
	closing[nclosing++] = fd;
	closing[nclosing++] = other;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: sockmap-proxy LISTEN_PORT BACKEND_PORT...\n");
		return 2;
	}
	if (load_program())
		return 1;
	struct sockaddr_in backends[MAX_BACKENDS];
	int nb = 0;
	for (int i = 2; i < argc && nb < MAX_BACKENDS; i++, nb++) {
		backends[nb] = (struct sockaddr_in){ .sin_family = AF_INET,
						     .sin_port = htons(atoi(argv[i])) };
		inet_pton(AF_INET, "127.0.0.1", &backends[nb].sin_addr);
	}
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
	inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
	int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 4096)) {
		perror("sockmap-proxy: listen");
		return 1;
	}
	int ep = epoll_create1(0);
	struct epoll_event e = { .events = EPOLLIN, .data.fd = lfd };
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &e);
	unsigned next = 0;
	for (;;) {
		struct epoll_event events[64];
		int n = epoll_wait(ep, events, 64, -1);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd == lfd) {
				int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
				if (c >= 0)
					pair(ep, c, &backends[next++ % nb]);
			} else {
				unpair(fd);
			}
		}
		while (nclosing > 0)
			close(closing[--nclosing]);
	}
}
