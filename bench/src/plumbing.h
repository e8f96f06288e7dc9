/*
 * plumbing.h: what any process daemon does around one run, at minimum: two pipes, a new
 * session, /dev/null on stdin, read stdout and stderr to EOF, reap. Shared by physlimits
 * (the spawner alone) and floorsrv (the same behind HTTP). Header-only: each bench tool is
 * one file.
 */
#ifndef BENCH_PLUMBING_H
#define BENCH_PLUMBING_H

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* Runs /bin/true with the plumbing; *pid gets its pid. Returns its wait status. */
static int run_true_plumbed(pid_t *pid)
{
    static char *const argv[] = {"/bin/true", NULL};
    int o[2], e[2];
    if (pipe2(o, O_CLOEXEC) || pipe2(e, O_CLOEXEC)) {
        perror("pipe2");
        exit(1);
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, o[1], 1);
    posix_spawn_file_actions_adddup2(&fa, e[1], 2);
    posix_spawnattr_init(&at);
#ifdef POSIX_SPAWN_SETSID
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSID);
#endif
    pid_t p;
    if (posix_spawn(&p, "/bin/true", &fa, &at, argv, environ)) {
        perror("posix_spawn");
        exit(1);
    }
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close(o[1]);
    close(e[1]);
    struct pollfd pf[2] = {{.fd = o[0], .events = POLLIN}, {.fd = e[0], .events = POLLIN}};
    int open_fds = 2;
    char buf[4096];
    for (int guard = 0; open_fds && guard < 1000; guard++) {
        if (poll(pf, 2, 5000) <= 0)
            break;
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd >= 0 && pf[i].revents) {
                if (read(pf[i].fd, buf, sizeof buf) <= 0) {
                    close(pf[i].fd);
                    pf[i].fd = -1;
                    open_fds--;
                }
            }
        }
    }
    for (int i = 0; i < 2; i++)
        if (pf[i].fd >= 0)
            close(pf[i].fd);
    int st = 0;
    waitpid(p, &st, 0);
    if (pid)
        *pid = p;
    return st;
}

/* `sh -c cmd` with its stdout into a pipe; *rfd gets the read end. */
static pid_t spawn_producer(const char *cmd, int *rfd)
{
    int fd[2];
    if (pipe2(fd, O_CLOEXEC))
        exit(1);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fd[1], 1);
    char *argv[] = {"sh", "-c", (char *)cmd, NULL};
    pid_t p;
    if (posix_spawn(&p, "/bin/sh", &fa, NULL, argv, environ)) {
        perror("spawn");
        exit(1);
    }
    posix_spawn_file_actions_destroy(&fa);
    close(fd[1]);
    *rfd = fd[0];
    return p;
}

#endif
