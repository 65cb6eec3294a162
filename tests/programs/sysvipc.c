/* sysvipc: a parent and its child sharing a SysV semaphore set and a SysV
 * message queue.
 *
 *   sysvipc [-n N] [-t MS] [-s STOPFILE] -k KEY [-u]
 *
 * KEY (hex) names a set of 3 semaphores (mode 0640) and KEY+1 a message
 * queue (mode 0620). Semaphore 0 counts the parent's ticks (it adds 1 each
 * tick, and checks GETVAL against its own count); semaphore 1 is a lock
 * both processes take (IPC_NOWAIT, retried) around a shared count of
 * their turns in the set's... own semaphore 2, which each process bumps
 * while it holds the lock; so the value of semaphore 2 is the sum of the
 * turns each process counted in its own memory (the parent reads the
 * child's count from the pipe the child writes it to).
 *
 * The queue: every tick the parent sends one message of each type 1..4,
 * of type*8 bytes, made from (type, tick). The child receives only type 2
 * (msgrcv with msgtyp 2, IPC_NOWAIT), in order: each must be the next
 * tick's. The parent receives types 1, 3 and 4 ten ticks late, in order:
 * about 30 messages of three types are always in the queue. IPC_STAT
 * gives the key, mode and the number of messages the parent expects.
 *
 * -u: undo adjustments. A second set (KEY+2, 2 semaphores: a lock at 1,
 * a count at 5). The child takes the lock with SEM_UNDO and holds it for
 * ever (its adjustment +1) and adds 2 to the count with SEM_UNDO (-2); a
 * third process (the "exiter") takes 3 from the count with SEM_UNDO
 * (+3). Every tick the parent checks the lock is 0 and the count 4. At
 * the stop tick it kills the exiter, and the kernel's undo must bring the
 * count to 7; then the child, and the lock must be 1 and the count 5.
 *
 * At the stop tick the parent stops the child, removes both and prints
 * DONE.
 */
#include "common.h"
#include <signal.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/wait.h>

#define LAG 10

static key_t key;
static int undo;
static int semid, msqid, usemid = -1;

struct msg {
    long mtype;
    uint64_t w[4];
};

static void opt(int c, const char *arg)
{
    if (c == 'k') key = (key_t)strtoul(arg, NULL, 16);
    if (c == 'u') undo = 1;
    (void)arg;
}

static void semon(int id, int n, int op, int flags, const char *who)
{
    struct sembuf b = { .sem_num = (unsigned short)n, .sem_op = (short)op, .sem_flg = (short)flags };
    for (int tries = 0;; tries++) {
        if (semop(id, &b, 1) == 0)
            return;
        if (errno != EAGAIN && errno != EINTR)
            ct_fail("%s: semop(%d, sem %d, %+d): %s", who, id, n, op, strerror(errno));
        if (tries > 20000)
            ct_fail("%s: semaphore %d stayed taken for 20 s", who, n);
        usleep(1000);
    }
}

static void sem(int n, int op, int flags, const char *who)
{
    semon(semid, n, op, flags, who);
}

/* Waits until the undo set's values are (lock, count). */
static void wait_undo(int lock, int count, const char *what)
{
    for (int i = 0; i < 20000; i++) {
        if (semctl(usemid, 0, GETVAL) == lock && semctl(usemid, 1, GETVAL) == count)
            return;
        usleep(1000);
    }
    ct_fail("%s: the undo set is lock %d count %d, expected %d %d", what, semctl(usemid, 0, GETVAL), semctl(usemid, 1, GETVAL), lock, count);
}

static void fill(struct msg *m, long type, long tick)
{
    m->mtype = type;
    for (int i = 0; i < 4; i++)
        m->w[i] = ct_mix64((uint64_t)type * 1000003u + (uint64_t)tick * 7 + (uint64_t)i);
}

/* Receives the next message of `type`, which must be tick's. 0: none. */
static int take(long type, long tick, const char *who)
{
    struct msg m, want;
    ssize_t n = msgrcv(msqid, &m, sizeof m.w, type, IPC_NOWAIT);
    if (n < 0) {
        if (errno == ENOMSG || errno == EINTR)
            return 0;
        ct_fail("%s: msgrcv(%d, type %ld): %s", who, msqid, type, strerror(errno));
    }
    fill(&want, type, tick);
    if (n != type * 8 || m.mtype != type || memcmp(m.w, want.w, (size_t)n) != 0)
        ct_fail("%s: message of type %ld is not tick %ld's (%zd bytes, type %ld)", who, type, tick, n, m.mtype);
    return 1;
}

static void check_stat(long expect_qnum, const char *who)
{
    struct msqid_ds q;
    struct semid_ds s;
    if (msgctl(msqid, IPC_STAT, &q) != 0)
        ct_fail("%s: msgctl(%d, IPC_STAT): %s", who, msqid, strerror(errno));
    if (q.msg_perm.__key != key + 1 || (q.msg_perm.mode & 0777) != 0620)
        ct_fail("%s: queue %d: key %#x mode %o, expected %#x 0620", who, msqid, (unsigned)q.msg_perm.__key, q.msg_perm.mode & 0777, (unsigned)key + 1);
    if (expect_qnum >= 0 && ((long)q.msg_qnum < expect_qnum || (long)q.msg_qnum > expect_qnum + LAG + 2))
        ct_fail("%s: queue %d holds %ld messages, expected %ld (and the child's type 2)", who, msqid, (long)q.msg_qnum, expect_qnum);
    if (semctl(semid, 0, IPC_STAT, &s) != 0)
        ct_fail("%s: semctl(%d, IPC_STAT): %s", who, semid, strerror(errno));
    if (s.sem_perm.__key != key || (s.sem_perm.mode & 0777) != 0640 || s.sem_nsems != 3)
        ct_fail("%s: set %d: key %#x mode %o nsems %d", who, semid, (unsigned)s.sem_perm.__key, s.sem_perm.mode & 0777, (int)s.sem_nsems);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "k:u", opt);
    ct_setup();
    if (!key)
        ct_fail("-k KEY is required");
    semid = semget(key, 3, IPC_CREAT | IPC_EXCL | 0640);
    msqid = msgget(key + 1, IPC_CREAT | IPC_EXCL | 0620);
    if (semid < 0 || msqid < 0)
        ct_fail("semget/msgget(%#x): %s", (unsigned)key, strerror(errno));
    unsigned short init[3] = { 0, 1, 0 };
    if (semctl(semid, 0, SETALL, init) != 0)
        ct_fail("SETALL: %s", strerror(errno));
    pid_t exiter = -1;
    if (undo) {
        usemid = semget(key + 2, 2, IPC_CREAT | IPC_EXCL | 0600);
        unsigned short u[2] = { 1, 5 };
        if (usemid < 0 || semctl(usemid, 0, SETALL, u) != 0)
            ct_fail("undo set %#x: %s", (unsigned)key + 2, strerror(errno));
    }
    int fds[2];
    if (pipe(fds) != 0)
        ct_fail("pipe: %s", strerror(errno));

    pid_t child = fork();
    if (child == 0) {
        ct_pid = getpid();
        ct_tid = ct_gettid();
        close(fds[0]);
        if (undo) {
            semon(usemid, 0, -1, SEM_UNDO | IPC_NOWAIT, "child");
            semon(usemid, 1, 2, SEM_UNDO | IPC_NOWAIT, "child");
        }
        long next = 1, turns = 0;
        for (;;) {
            ct_check_ids();
            check_stat(-1, "child");
            while (take(2, next, "child"))
                next++;
            sem(1, -1, 0, "child");
            sem(2, 1, 0, "child");
            turns++;
            sem(1, 1, 0, "child");
            if (write(fds[1], &turns, sizeof turns) != sizeof turns)
                ct_fail("child: write: %s", strerror(errno));
            ct_sleep_ms(ct_interval_ms);
        }
    }
    close(fds[1]);
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    if (undo) {
        wait_undo(0, 7, "after the child's SEM_UNDO");
        exiter = fork();
        if (exiter == 0) {
            ct_pid = getpid();
            ct_tid = ct_gettid();
            semon(usemid, 1, -3, SEM_UNDO | IPC_NOWAIT, "exiter");
            for (;;) {
                ct_check_ids();
                ct_sleep_ms(ct_interval_ms);
            }
        }
        wait_undo(0, 4, "after the exiter's SEM_UNDO");
    }
    printf("READY child %d sem %d msq %d\n", (int)child, semid, msqid);
    long turns = 0, child_turns = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int st;
        if (waitpid(child, &st, WNOHANG) != 0)
            ct_fail("the child ended (status %#x)", st);
        if (undo) {
            int l = semctl(usemid, 0, GETVAL), c = semctl(usemid, 1, GETVAL);
            if (l != 0 || c != 4)
                ct_fail("the undo set is lock %d count %d, expected 0 4", l, c);
        }
        /* The count of ticks. */
        int v = semctl(semid, 0, GETVAL);
        if (v != tick - 1)
            ct_fail("semaphore 0 is %d, expected %ld", v, tick - 1);
        sem(0, 1, 0, "parent");
        /* The shared count under the lock: the child's turns it told us
         * plus ours, and at most the child's turn in flight more. */
        sem(1, -1, 0, "parent");
        long t;
        while (read(fds[0], &t, sizeof t) == sizeof t)
            child_turns = t;
        v = semctl(semid, 2, GETVAL);
        if (v < turns + child_turns || v > turns + child_turns + 1)
            ct_fail("semaphore 2 is %d, expected %ld (parent %ld + child %ld)", v, turns + child_turns, turns, child_turns);
        sem(2, 1, 0, "parent");
        turns++;
        sem(1, 1, 0, "parent");
        /* The messages. */
        for (long type = 1; type <= 4; type++) {
            struct msg m;
            fill(&m, type, tick);
            if (msgsnd(msqid, &m, (size_t)type * 8, IPC_NOWAIT) != 0)
                ct_fail("msgsnd(%d, type %ld): %s", msqid, type, strerror(errno));
        }
        if (tick > LAG) {
            for (long type = 1; type <= 4; type++)
                if (type != 2 && !take(type, tick - LAG, "parent"))
                    ct_fail("no message of type %ld for tick %ld", type, tick - LAG);
        }
        check_stat(3 * (tick < LAG ? tick : LAG), "parent");
        printf("TICK %ld sem %ld child %ld\n", tick, tick, child_turns);
        if (ct_should_stop(tick)) {
            if (undo) {
                /* The kernel's undo of each process at its exit. */
                kill(exiter, SIGKILL);
                waitpid(exiter, &st, 0);
                wait_undo(0, 7, "after the exiter's exit (its undo +3)");
                kill(child, SIGKILL);
                waitpid(child, &st, 0);
                wait_undo(1, 5, "after the child's exit (its undo +1, -2)");
                if (semctl(usemid, 0, IPC_RMID) != 0)
                    ct_fail("IPC_RMID undo set: %s", strerror(errno));
            }
            kill(child, SIGKILL);
            waitpid(child, &st, 0);
            if (semctl(semid, 0, IPC_RMID) != 0 || msgctl(msqid, IPC_RMID, NULL) != 0)
                ct_fail("IPC_RMID: %s", strerror(errno));
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
